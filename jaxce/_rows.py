r"""Cross-entropy losses on logits, with closed-form :math:`p - y` backward passes.

One piece of mathematics serves every path (in place, blockwise in :mod:`jaxce._linear`, and
sharded across a mesh axis). For one example with (softcapped) logits :math:`z`, class mask
:math:`m`, class weights :math:`w` and labels :math:`y` (a distribution, or a one-hot picked
by comparing an iota with the integer label), the effective target is

.. math::
    t_k = w_k\, m_k \big((1 - \varepsilon)\, y_k + \varepsilon / K_m\big),
    \qquad K_m = \textstyle\sum_k m_k,

and the loss, with :math:`T = \sum_k t_k` and :math:`\ell = \operatorname{lse}(z)`, is

.. math::
    L = \sum_k t_k (\ell - z_k) + \lambda_z \ell^2
      = T \log s + \sum_k t_k (c - z_k) + \lambda_z \ell^2,

with :math:`s = \sum_k e^{z_k - c}` for a per-row shift :math:`c`. Label distributions take
the maximum :math:`c = \max_k z_k`: every term on the right is then non-negative, so there is
no cancellation even for logits of 1e4. Integer labels take the label's own logit
:math:`c = z_y`, which needs no max pass: the plain loss is then :math:`\log s \ge 0` itself
(the label's term of s is 1), and a row whose :math:`e^{z_k - z_y}` overflows falls back to
the maximum. Its gradient is

.. math::
    \frac{\partial L}{\partial z_k} = p_k (T + 2 \lambda_z \ell) - t_k,

which is :math:`p - y` for a plain one-hot or distribution label. Everything a path needs
is a gathered label logit or a max, and sums over classes; a sharded path combines them with
``psum``/``pmax``.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._entries import entry_cotangents, local_entries, sparse_outside
from ._information import xdiff
from ._normalizer import (
    Normalizer,
    label_lookup,
    label_normalizer,
    peak_shift,
    row_max,
    shifted_normalizer,
)
from ._row_sums import (
    capped_logits,
    count_possible,
    exact_gap,
    finite_gap,
    in_row_blocks,
    low_precision,
    possible_classes,
    possible_indicator,
    reduce_rows,
    smoothed_targets,
    softcap,
    softcap_keeping_impossible,
    summable,
    unless_impossible,
    upcast_unshared,
    xla_cpu_form,
)
from ._softmax import finite_or_zero, masked_fill
from ._spec import (
    SparseLabels,
    Spec,
    class_shards,
    class_sum,
    sum_like,
)
from ._validation import (
    compute_dtype,
)


class RowStats(NamedTuple):
    """Per-example results of the forward pass (all of the batch shape)."""

    loss: jax.Array  # sum_k t_k (lse - z_k) + z_loss * lse**2, in nats
    normalizer: Normalizer
    target_mass: jax.Array  # T = sum_k t_k
    num_possible: jax.Array  # K_m with label smoothing (0 without: unused)
    correct: jax.Array  # 1.0 where the label's logit is the largest (integer labels)

    @property
    def logsumexp(self) -> jax.Array:
        return self.normalizer.lse


def _smoothing_sums(raw, z, mask, class_weights, shift, spec: Spec):
    """``(K_m, sum_k w_k m_k, sum_k w_k m_k (c - z_k))`` over the possible classes m (local).

    Without a mask, one fused pass ``sum_k w_k (c - z_k)`` is exact when no row holds a -inf
    logit (then m = 1 and K_m = K); only otherwise the select-free sums run, under a cond.
    With a mask, the select form (``z`` are the capped, -inf-masked logits).
    """
    dtype = z.dtype
    w = jnp.ones(z.shape[-1:], dtype) if class_weights is None else class_weights
    capped = lambda r: softcap_keeping_impossible(r.astype(dtype), spec)
    if mask is not None:
        possible = possible_classes(raw, mask)
        wm = w * possible.astype(dtype)
        gap = jnp.sum(xdiff(wm, shift[..., None], z), axis=-1)
        return jnp.sum(possible, axis=-1, dtype=dtype), jnp.sum(wm, axis=-1), gap

    def all_possible():
        gap = reduce_rows(lambda r, c, w: w * (c - capped(r)), (raw,), (shift,), (w,))
        zero = 0.0 * gap  # (a row vector from data, see if_all_finite)
        return zero + z.shape[-1], zero + jnp.sum(w), gap

    def sums(raw, shift):
        zf = raw.astype(dtype)
        m = possible_indicator(zf)
        return jnp.sum(m, axis=-1), jnp.sum(w * m, axis=-1), finite_gap(w * m, capped(zf), shift)

    exact = lambda: in_row_blocks(sums, raw, shift, blocked=low_precision(raw))
    return unless_impossible(raw, all_possible, exact)


def _label_logit(raw, labels, mask, spec: Spec):
    """``(z_y, found)``: the label's capped logit (-inf on an impossible class), O(N).

    Gathered from the raw logits and capped / masked afterwards, so that the capped, masked
    [N, K] logits need not be materialised for the gather.
    """
    # bfloat16 logits are gathered as bits (see upcast_unshared).
    values = lax.bitcast_convert_type(raw, jnp.uint16) if raw.dtype == jnp.bfloat16 else raw
    raw_label_logit, found = label_lookup(values, labels, spec, upcast_unshared)
    return capped_label_logit(raw_label_logit, found, labels, mask, spec)


def capped_label_logit(raw_label_logit, found, labels, mask, spec: Spec):
    """``(z_y, found)`` from the label's raw logit, gathered (and summed) from the slices of
    classes that hold it, and ``found``, how many hold it: 0 for a label outside [0, K), whose
    logit is then -inf. Capped, and -inf on an impossible (masked or -inf) class."""
    label_possible = (raw_label_logit > -jnp.inf) & (found == 1)
    if mask is not None:
        label_possible &= label_lookup(mask.astype(jnp.int32), labels, spec)[0] > 0
    return jnp.where(label_possible, softcap(raw_label_logit, spec), -jnp.inf), found


def _integer_terms(labels, class_weights, label_logit, found, shift, smoothing, spec: Spec):
    """``(T, sum_k t_k (c - z_k), K_m)`` for integer labels and the normaliser's shift c.

    O(N) given ``smoothing``, the class sums of :func:`_smoothing_sums` (None without it; K_m is
    None then). With :math:`b = (1 - \\varepsilon) w_y` and :math:`e = \\varepsilon / K_m`:
    :math:`T = b + e \\sum_k w_k m_k` and the gap is
    :math:`b (c - z_y) + e \\sum_k w_k m_k (c - z_k)`; only the smoothing needs class sums.
    """
    weight = 1.0 if class_weights is None else label_lookup(class_weights, labels, spec)[0]
    # b = 0 for a label outside [0, K), as the iota comparison of the backward pass finds no class.
    b = jnp.where(found == 1, (1.0 - spec.label_smoothing) * weight, 0.0)
    # b * (c - z_y): 0 for a label of weight 0, +inf for a label on an impossible class.
    return _smoothed_terms(b, xdiff(b, shift, label_logit), smoothing, spec)


def _entry_logits(raw, labels: SparseLabels, mask, spec: Spec):
    """``(z_j, a_j, bad)`` for sparse labels: each entry's capped logit (-inf on an impossible
    class), its weight where it takes part, and the rows holding an entry of non-zero weight
    outside [0, K) (NaN), by O(N k) gathers, as :func:`_label_logit`.

    An entry takes part when its index is in [0, K) and its class is not masked (a masked
    entry takes no part, as a masked soft label); elsewhere its weight is 0, so that an entry
    of weight 0 (padding, with index -1) adds nothing whatever its index. An entry on a -inf
    logit takes part: with a positive weight the loss is +inf, as the dense loss's.
    """
    values = lax.bitcast_convert_type(raw, jnp.uint16) if raw.dtype == jnp.bfloat16 else raw
    raw_logits, found = label_lookup(values, labels.indices, spec, upcast_unshared)
    return capped_entry_logits(raw_logits, found, labels, mask, spec)


def capped_entry_logits(raw_logits, found, labels: SparseLabels, mask, spec: Spec):
    """:func:`_entry_logits` from the entries' raw logits, gathered (and summed) from the slices
    of classes that hold them, and ``found``, how many hold each."""
    held = found == 1
    part = held
    if mask is not None:
        part &= label_lookup(mask.astype(jnp.int32), labels.indices, spec)[0] > 0
    weights = jnp.where(part, labels.weights, 0.0)
    logits = jnp.where(held & (raw_logits > -jnp.inf), softcap(raw_logits, spec), -jnp.inf)
    bad = jnp.any(~held & (labels.weights != 0), axis=-1)
    return logits, weights, bad


def _sparse_terms(labels: SparseLabels, weights, logits, class_weights, shift, smoothing, spec):
    r"""``(T, sum_k t_k (c - z_k), K_m)`` for sparse labels: :func:`_integer_terms` summed over the
    k entries, of weights :math:`b_j = (1 - \varepsilon) w_{i_j} a_j` (``weights`` a_j from
    :func:`_entry_logits`); O(N k) but for label smoothing. Duplicates add up."""
    b = (1.0 - spec.label_smoothing) * weights if spec.label_smoothing else weights
    if class_weights is not None:
        b = b * label_lookup(class_weights, labels.indices, spec)[0]
    gap = jnp.sum(xdiff(b, shift[..., None], logits), axis=-1)
    return _smoothed_terms(jnp.sum(b, axis=-1), gap, smoothing, spec)


def _smoothed_terms(mass, gap, smoothing, spec: Spec):
    """``(T, gap, K_m)``: the labels' mass and gap plus label smoothing's, from ``smoothing`` =
    ``(K_m, W_m, sum_k w_k m_k (c - z_k))`` over all classes (None without smoothing: K_m None)."""
    if not spec.label_smoothing:
        return mass, gap, None
    num_possible, weight_sum, spread = smoothing
    e = spec.label_smoothing / jnp.maximum(num_possible, 1.0)
    return mass + e * weight_sum, gap + e * spread, num_possible


def smoothing_sums(raw, z, mask, class_weights, shift, spec: Spec):
    """:func:`_smoothing_sums` over all shards; None without label smoothing."""
    if not spec.label_smoothing:
        return None
    return tuple(class_sum(x, spec) for x in _smoothing_sums(raw, z, mask, class_weights, shift, spec))


def _soft_terms(raw, labels, mask, class_weights, top, normalizer, spec: Spec):
    """``(T, sum_k t_k (M - z_k), K_m)`` for label distributions (K_m None without smoothing).

    The plain product ``t (M - z)`` is one fused pass, exact when no logit is -inf; otherwise
    (and with a mask, which sets logits to -inf) the select-free exact gap: 0 where t_k = 0
    even if z_k = -inf, +inf where a target puts mass on an impossible class. ``top`` (the
    max) rather than the normaliser's shift is a broadcast the logsumexp pass does not share,
    so XLA fuses it instead of writing it out. The targets are rebuilt from the raw inputs in
    each branch (the cond's operands stay the raw inputs); the fast branch (no mask, no -inf
    logit) knows every class is possible and needs no compare. :math:`T = (1 - \\varepsilon) \\sum_k w_k y_k +
    \\varepsilon W_m / K_m` needs none either.
    """
    dtype = compute_dtype(raw.dtype)
    eps = spec.label_smoothing
    w = jnp.ones(raw.shape[-1:], dtype) if class_weights is None else class_weights
    num_possible = weight_possible = None
    if eps:
        num_possible, weight_possible = count_possible(raw, mask, class_weights, spec)

    def block_gap(raw, labels, mask, shift, num_possible):
        possible = possible_classes(raw, mask)
        t = smoothed_targets(
            labels, mask, possible, class_weights, spec, dtype, num_possible, scattered=False
        )[1]
        return exact_gap(t, capped_logits(raw, mask, spec), shift)

    def fast():
        # Every class is possible here: the smoothing's term is eps / K sum_k w_k (M - z_k),
        # a sum of its own (its targets, shared with the backward pass, would be written out).
        z = lambda raw: softcap_keeping_impossible(raw.astype(dtype), spec)
        gap = reduce_rows(
            lambda r, y, m, w: w * y.astype(dtype) * (m - z(r)), (raw, labels), (top,), (w,)
        )
        if not eps:
            return gap
        # -(z + (-M)): not the broadcast of M above (a shared one is written out as [N, K])
        spread = -reduce_rows(lambda r, neg_m, w: w * (z(r) + neg_m), (raw,), (-top,), (w,))
        return (1.0 - eps) * gap + eps * spread / jnp.maximum(num_possible, 1.0)

    selects = mask is None and (bool(eps) or spec.logit_softcap is not None)
    exact = lambda: in_row_blocks(
        block_gap, raw, labels, mask, normalizer.shift, num_possible,
        blocked=low_precision(raw) or selects,
    )
    gap = exact() if mask is not None else unless_impossible(raw, fast, exact)
    mass = class_sum(jnp.sum(w * masked_fill(labels.astype(dtype), mask, 0.0), axis=-1), spec)
    if eps:
        mass = (1.0 - eps) * mass + eps * weight_possible / jnp.maximum(num_possible, 1.0)
    return mass, class_sum(gap, spec), num_possible


def z_loss_term(lse, spec: Spec) -> jax.Array:
    r""":math:`\lambda_z \operatorname{lse}^2`; 0 without z-loss (0 * lse**2 would be NaN for
    |lse| > 1.8e19 in float32) and for rows without a possible class (lse = -inf)."""
    if not spec.z_loss:
        return jnp.zeros_like(lse)
    return spec.z_loss * finite_or_zero(lse) ** 2


def row_stats(z, labels, mask, class_weights, spec: Spec) -> RowStats:
    """Forward pass on raw logits ``z`` [..., K_local] (any float dtype): loss, lse, T, correct.

    Integer labels shift the normaliser by the label's logit (one pass over the logits; the
    max pass behind ``correct`` is dropped by XLA unless ``correct`` is used), sparse labels by
    the largest logit of their entries that take part; label distributions shift it by the row
    maximum.
    """
    raw, z = z, capped_logits(z, mask, spec)
    top = row_max(raw, z, mask, spec)
    smoothing = lambda shift: smoothing_sums(raw, z, mask, class_weights, shift, spec)
    if spec.integer_labels:
        label_logit, found = _label_logit(raw, labels, mask, spec)
        normalizer = label_normalizer(raw, z, label_logit, mask, spec)
        return integer_label_stats(
            labels, class_weights, label_logit, found, normalizer, top,
            smoothing(normalizer.shift), spec,
        )
    if spec.sparse_labels:
        # s = sum_k e^{z_k - c} >= 1 for c the largest entry logit: every term of the loss is
        # then non-negative (for non-negative weights), as with the label's logit or the max.
        entries = _entry_logits(raw, labels, mask, spec)
        logits, weights, _ = entries
        lead = jnp.max(jnp.where(weights != 0, logits, -jnp.inf), axis=-1, initial=-jnp.inf)
        normalizer = label_normalizer(raw, z, lead, mask, spec)
        return sparse_label_stats(
            labels, class_weights, entries, normalizer, top, smoothing(normalizer.shift), spec
        )
    normalizer = shifted_normalizer(summable(raw, z, mask, spec), peak_shift(top), spec)
    terms = _soft_terms(raw, labels, mask, class_weights, top, normalizer, spec)
    return _finish_stats(normalizer, *terms, jnp.zeros_like(top), None, spec)


def integer_label_stats(
    labels, class_weights, label_logit, found, normalizer, top, smoothing, spec: Spec
) -> RowStats:
    """:class:`RowStats` of integer labels, whichever way the logits' sums were taken: the
    capped label logit and ``found`` (:func:`capped_label_logit`), the ``normalizer``, the row
    maximum ``top`` and the smoothing's sums relative to the normaliser's shift
    (:func:`smoothing_sums`, None without smoothing)."""
    terms = _integer_terms(labels, class_weights, label_logit, found, normalizer.shift, smoothing, spec)
    correct = ((label_logit >= top) & (label_logit > -jnp.inf)).astype(top.dtype)
    # A label outside [0, K) has no class: NaN, never a silent wrap to another class.
    return _finish_stats(normalizer, *terms, correct, found != 1, spec)


def sparse_label_stats(labels, class_weights, entries, normalizer, top, smoothing, spec: Spec) -> RowStats:
    """:class:`RowStats` of sparse labels, as :func:`integer_label_stats`; ``entries`` =
    ``(logits, weights, bad)`` of :func:`capped_entry_logits`."""
    logits, weights, bad = entries
    terms = _sparse_terms(labels, weights, logits, class_weights, normalizer.shift, smoothing, spec)
    # An entry of non-zero weight outside [0, K): NaN, as an integer label there.
    return _finish_stats(normalizer, *terms, jnp.zeros_like(top), bad, spec)


def _finish_stats(normalizer, target_mass, gap, num_possible, correct, invalid, spec) -> RowStats:
    r"""The loss :math:`T \log s + \text{gap} + \lambda_z \ell^2`; NaN on the ``invalid`` rows
    (None: none)."""
    loss = target_mass * normalizer.log_sum + gap
    # A row with no possible class (all -inf): any target mass is on impossible classes, +inf
    # (log_sum -inf meets a gap of +inf there: NaN).
    empty = normalizer.log_sum == -jnp.inf
    loss = jnp.where(empty, jnp.where(target_mass > 0, jnp.inf, 0.0), loss)
    if spec.z_loss:
        loss = loss + z_loss_term(normalizer.lse, spec)
    if invalid is not None:
        loss = jnp.where(invalid, jnp.nan, loss)
    if num_possible is None:
        num_possible = jnp.zeros_like(target_mass)
    return RowStats(loss, normalizer, target_mass, num_possible, correct)


def _noisy_rows(idle, normalizer, target_mass) -> jax.Array:
    """The ``idle`` rows that hold a NaN or infinite logit or label: a non-finite shift, mass
    or log-sum (-inf, a row without a possible class, is harmless)."""
    finite = jnp.isfinite(normalizer.shift) & jnp.isfinite(target_mass)
    finite &= (normalizer.log_sum < jnp.inf) & ~jnp.isnan(normalizer.log_sum)
    return idle & ~finite


def row_cotangents(
    z, labels, mask, class_weights, normalizer, target_mass, num_possible, g_loss, g_lse, spec: Spec,
    *, columns=None, dtype=None, scatter=False, idle=None,
):
    r"""Backward pass: ``(dz, dlabels, dclass_weights)`` from the closed form.

    Every class's cotangent needs only its own logit and the row's saved statistics, so ``z``
    may hold a slice of the (local) classes: ``columns = (start, total)`` says it holds
    ``[start, start + K)`` of ``total`` (``mask`` and ``class_weights`` are then sliced alike).
    ``dz`` comes in ``dtype`` (by default ``z``'s, the compute dtype).

    .. math:: dz_k = p_k \big(g (T + 2 \lambda_z \ell) + g_\ell\big) - g\, t_k,

    times the softcap's derivative :math:`1 - (z'_k / c)^2`; impossible classes get 0.
    ``dlabels`` (soft labels) is :math:`-g (1 - \varepsilon) w \log p` (0 where masked);
    for sparse labels it is that at each entry's class, [..., k] (see :func:`jaxce._entries.entry_cotangents`;
    None with ``columns``, where the entries' classes may lie in other slices).
    ``dclass_weights`` is :math:`-\sum_n g\, u \log p`, summed over the rows of this block.
    Sparse labels' k entries are written into ``dz`` by a scatter, in place: no [N, K]
    target. So are integer labels (one entry of weight 1) with ``scatter`` (the in-place
    loss, whose result dz is) and a 32- or 64-bit ``dz``: on XLA:CPU an iota comparison in
    the pass that writes dz measured 1.3x optax's time at N=4096 V=32768 float32, the
    scatter 0.9x. Otherwise their target comes from comparing an iota with the labels.
    ``idle`` (None, or of the batch shape): rows left out, whose cotangents are 0; their
    share of every cotangent is exactly 0, whatever their logits and labels hold (where the
    closed form would give 0 * NaN).
    """
    noisy = None
    if idle is not None:
        # The noisy rows' statistics become 0: finite, for the O(N k) entries (their logits
        # too, below); their [N, K] share is selected away (``dense(quiet=True)``). A clean
        # idle row keeps its statistics: with them its p * 0 is 0.
        noisy_rows = _noisy_rows(idle, normalizer, target_mass)
        noisy = jnp.any(noisy_rows)
        quiet = lambda a, value=0.0: jnp.where(noisy_rows, value, a)
        normalizer = Normalizer(quiet(normalizer.shift), quiet(normalizer.log_sum))
        target_mass, num_possible = quiet(target_mass), quiet(num_possible, 1.0)
        if spec.integer_labels:
            labels = jnp.where(idle, 0, labels)
        elif spec.sparse_labels:
            labels = labels._replace(weights=jnp.where(idle[..., None], 0.0, labels.weights))
    # Integer labels are scattered where dz is the result (``scatter``), unless it is 16-bit:
    # XLA:CPU has no 16-bit scatter, and scattering its bits costs a copy of dz. Where dz feeds
    # matmuls (the fused loss's blocks), the comparison fuses into its producer, and a scatter
    # would keep the block's logits and dz both (twice the scratch).
    wide = jnp.dtype(dtype or z.dtype).itemsize > 2
    scattered = spec.sparse_labels or (spec.integer_labels and scatter and wide)
    if scattered:
        entries = labels if spec.sparse_labels else SparseLabels(
            labels[..., None], jnp.ones(labels.shape + (1,), z.dtype)
        )
        index, held = local_entries(entries.indices, z.shape[-1], spec, columns)
        raw = jnp.take_along_axis(z, index, axis=-1)
        if idle is not None:
            raw = jnp.where(noisy_rows[..., None], 0.0, raw)
    targets = functools.partial(
        smoothed_targets, labels, mask, class_weights=class_weights, spec=spec, dtype=z.dtype,
        num_possible=num_possible, columns=columns, scattered=scattered,
    )
    possible = possible_classes(z, mask)
    # (as the forward's capped logits: without a mask XLA:CPU measured faster with the same
    # expression, -inf kept, in both passes)
    cap = softcap if mask is not None else softcap_keeping_impossible
    capped = masked_fill(cap(z, spec), possible)
    u = targets(possible)[0]
    log_p = normalizer.log_probs(capped)
    lse = finite_or_zero(normalizer.lse)
    coef = g_loss * (target_mass + 2.0 * spec.z_loss * lse) + g_lse
    num_classes = (z.shape[-1] if columns is None else columns[1]) * class_shards(spec)
    if spec.integer_labels:
        # A label outside [0, K) has a NaN loss, and so a NaN gradient (ignored labels are 0).
        valid = (labels >= 0) & (labels < num_classes)
        coef = jnp.where(valid, coef, jnp.nan)
    bad = None
    if spec.sparse_labels:
        bad = sparse_outside(labels, num_classes)  # NaN, as the loss
        coef = jnp.where(bad, jnp.nan, coef)

    def cotangent(log_p, t, capped, possible):
        """dz from log p and the targets t (None: 0) of some classes: all, or the entries';
        0 off the ``possible`` ones (None: no select)."""
        dz = jnp.exp(log_p) * coef[..., None]
        if t is not None:
            dz = dz - g_loss[..., None] * t
        if spec.logit_softcap is not None:  # (the slope is 0 at -inf, not -inf: no select)
            c = spec.logit_softcap
            dz = dz * (1.0 - (jnp.maximum(capped, -c) / c) ** 2)
        return dz if possible is None else masked_fill(dz, possible, 0.0)

    def dense(select: bool, quiet: bool = False):
        """``cotangent`` over all classes, built from ``z`` (a cond's operands are written
        out); ``select=False`` gives an impossible class (-inf) its 0 by exp(-inf) = 0 alone,
        which holds without a mask or dense targets, in rows of finite ``coef``
        (and, with smoothing, whose share would go to every class, where all are possible).
        ``quiet``: the idle rows' classes are selected away too (their NaN or infinite
        logits or labels would give 0 * NaN).
        In ``dtype`` (a cond's float32 result would be written out before its rounding)."""
        possible = possible_classes(z, mask)
        possible = possible & ~idle[..., None] if quiet else possible
        capped = masked_fill(cap(z, spec), possible) if select else cap(z, spec)
        t = targets(possible if select else None)[1]
        dz = cotangent(normalizer.log_probs(capped), t, capped, possible if select else None)
        return dz if dtype is None else dz.astype(dtype)

    if mask is not None or not (scattered and wide):
        if idle is None or not wide:  # (XLA:CPU would copy a cond's 16-bit result)
            dz = dense(True, idle is not None)
        else:  # (XLA:CPU writes out the idle rows' select, shared, as [N, K]: only if noisy)
            dz = xla_cpu_form(
                lambda: lax.cond(noisy, lambda: dense(True, True), lambda: dense(True)),
                lambda: dense(True, True),
            )
    else:
        # XLA:CPU does not vectorise the compare and selects well: they took a third of the
        # backward's time at N=4096 V=32768 float32. Only NaN rows (labels out of range) need
        # them, to keep their impossible classes at 0. (Not for a 16-bit dz: the cond's result
        # would be a second copy of it besides the one its scattered bits make.)
        fast = jnp.all(jnp.isfinite(coef))
        quiet = idle is not None
        if quiet:
            fast &= ~noisy
        if spec.label_smoothing:
            fast &= jnp.all(num_possible == num_classes)
        dz = xla_cpu_form(
            lambda: lax.cond(fast, lambda: dense(False), lambda: dense(True, quiet)),
            lambda: dense(True, quiet),
        )
    g = g_loss[..., None]
    # -g * a * log p: exactly 0 where g * a = 0 (uncounted rows, zero targets), +inf where a
    # target meets an impossible class.
    neg_log_p = lambda a: xdiff(g * a, 0.0, log_p)
    dlabels = None
    if not spec.integer_labels and not spec.sparse_labels:
        w = 1.0 if class_weights is None else class_weights
        scale = jnp.broadcast_to((1.0 - spec.label_smoothing) * w, z.shape)
        dlabels = neg_log_p(masked_fill(scale, mask, 0.0))
    dweights = None
    if class_weights is not None and u is not None:
        if idle is not None and not spec.integer_labels:  # (NaN soft labels: 0 * NaN)
            u = jnp.where(idle[..., None], 0.0, u)
        dweights = jnp.sum(neg_log_p(u), axis=tuple(range(z.ndim - 1)))
    if scattered:  # (the entries are written in the final dtype)
        dz, dlabels, dweights = entry_cotangents(
            dz, dweights, cotangent, (raw, index, held),
            entries, mask, class_weights, normalizer, num_possible, g_loss, bad, spec, columns,
        )
    return dz, dlabels, dweights


# ----------------------------------------------------------------------------------------------
# The in-place path: a custom VJP over logits that hold every (local) class.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def row_losses(logits, labels, mask, counted, class_weights, spec: Spec):
    """Each row's loss, logsumexp and whether its label is the top class (integer labels).

    ``counted`` (None: every row) marks the rows whose loss the caller keeps: their
    cotangents are 0 elsewhere, and so is their gradient, whatever their logits and labels
    hold (see ``idle`` in :func:`row_cotangents`)."""
    stats = row_stats(logits, labels, mask, class_weights, spec)
    return stats.loss, stats.logsumexp, stats.correct


def _row_losses_fwd(logits, labels, mask, counted, class_weights, spec):
    # The primal is recomputed here rather than by calling row_losses, so that jax.hessian
    # (forward-over-reverse) can differentiate this function.
    stats = row_stats(logits, labels, mask, class_weights, spec)
    residuals = (logits, labels, mask, counted, class_weights, *stats[1:4])
    return (stats.loss, stats.logsumexp, stats.correct), residuals


def _row_losses_bwd(spec, residuals, cotangents):
    logits, labels, mask, counted, class_weights, normalizer, target_mass, num_possible = residuals
    g_loss, g_lse, _ = cotangents  # `correct` is piecewise constant: no gradient
    z = upcast_unshared(logits)
    # (sparse labels' weights come in the compute dtype)
    targets = labels if spec.integer_labels or spec.sparse_labels else upcast_unshared(labels)
    # Rows left out (ignored or masked examples) get no cotangent: their gradient is 0.
    idle = None if counted is None else ~counted & (g_lse == 0)
    dz, dlabels, dweights = row_cotangents(
        z, targets, mask, class_weights, normalizer, target_mass, num_possible, g_loss, g_lse, spec,
        dtype=logits.dtype, scatter=True, idle=idle,
    )
    if spec.sparse_labels:  # no gradient for the indices
        weights = labels.weights
        dlabels = SparseLabels(None, sum_like(dlabels.astype(weights.dtype), weights))
    elif dlabels is not None:
        dlabels = sum_like(dlabels.astype(labels.dtype), labels)
    if dweights is not None:
        dweights = sum_like(dweights.astype(class_weights.dtype), class_weights)
    return sum_like(dz.astype(logits.dtype), logits), dlabels, None, None, dweights


row_losses.defvjp(_row_losses_fwd, _row_losses_bwd)
