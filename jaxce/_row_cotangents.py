r"""The backward pass of the cross-entropies on rows of logits: the closed form
:math:`dz_k = p_k (g (T + 2 \lambda_z \ell) + g_\ell) - g\, t_k` (see :mod:`jaxce._rows`), from
a block of logits and the row statistics the forward pass saved."""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ._entries import entry_cotangents, local_entries, sparse_outside
from ._information import xdiff
from ._normalizer import Normalizer
from ._row_sums import (
    possible_classes,
    smoothed_targets,
    softcap,
    softcap_keeping_impossible,
    xla_cpu_form,
)
from ._softmax import finite_or_zero, masked_fill
from ._spec import SparseLabels, Spec, class_shards


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
