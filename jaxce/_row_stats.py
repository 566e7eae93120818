r"""The forward pass of the cross-entropies on rows of logits: each row's loss, normaliser
(logsumexp), target mass and, for integer labels, whether the label is the top class.

The mathematics, shared with the backward pass (:mod:`jaxce._row_cotangents`), is in
:mod:`jaxce._rows`. Every path (in place, the fused loss's blocks and tiles, sharded) turns
its sums over classes into :class:`RowStats` by the functions here, so each option is handled
once.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

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
)
from ._softmax import finite_or_zero, masked_fill
from ._spec import SparseLabels, Spec, class_sum
from ._validation import compute_dtype


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
