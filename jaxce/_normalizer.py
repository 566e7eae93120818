"""Each row's log-normaliser (kept as a shift and a log-sum, so that no precision is lost)
and the label's logit: what every softmax cross-entropy path gathers before its sums."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._row_sums import (
    capped_logits,
    if_all_finite,
    in_row_blocks,
    reduce_rows,
    softcap_keeping_impossible,
    sum_exp,
    summable,
)
from ._softmax import finite_or_zero
from ._spec import (
    Spec,
    class_max,
    class_offset,
    class_sum,
)


class Normalizer(NamedTuple):
    """Each row's log-normaliser, kept in two parts so that no precision is lost.

    :math:`\\operatorname{lse}(z) = c + \\log s` with a finite per-row shift :math:`c` and
    :math:`s = \\sum_k e^{z_k - c}`: the row's maximum (soft labels), or the label's logit
    (integer labels, where :math:`\\log s` is then the loss itself). For logits near 1e4
    (or 3e38) the sum ``c + log s`` rounds away most of ``log s``; probabilities formed as
    ``exp((z - c) - log s)`` keep it.
    """

    shift: jax.Array
    log_sum: jax.Array

    @property
    def lse(self) -> jax.Array:
        return self.shift + self.log_sum

    def log_probs(self, z: jax.Array) -> jax.Array:
        """``log p = (z - c) - log s`` for -inf-masked logits ``z`` [..., K].

        ``z + (-c)`` is ``z - c`` exactly; so written, it is not the forward's broadcast of c,
        which XLA:CPU would otherwise share and write out as [N, K] instead of fusing it into
        the logsumexp reduction.
        """
        return (z + (-self.shift)[..., None]) - finite_or_zero(self.log_sum)[..., None]


def shifted_normalizer(z, shift, spec: Spec) -> Normalizer:
    """:math:`\\log \\sum_k e^{z_k - c}` of -inf-masked logits ``z`` (any float dtype) for a
    finite shift c (all shards)."""
    log_sum = jnp.log(class_sum(sum_exp(z, shift), spec))
    return Normalizer(shift, log_sum)


def row_max(raw, z, mask, spec: Spec) -> jax.Array:
    """Each row's largest (capped, masked) logit over all shards; -inf for an empty row."""
    if mask is None:
        # The max of the raw dtype is exact; taken before the upcast, XLA fuses the upcast into
        # each pass instead of writing an upcast copy of the (bf16) logits. The softcap is
        # increasing: the capped maximum is the cap of the maximum (no tanh per logit).
        top = class_max(reduce_rows(lambda r: r, (raw,), op=jnp.max).astype(z.dtype), spec)
        return softcap_keeping_impossible(top, spec)
    return class_max(reduce_rows(lambda z: z, (z,), op=jnp.max), spec)


def peak_shift(top):
    """The row maximum as a shift: 0 for an empty row (log_sum is then -inf). A +inf logit
    makes the row NaN (inf - inf), as documented, rather than a finite number."""
    return jnp.where(top == -jnp.inf, 0.0, top)


def label_normalizer(raw, z, label_logit, mask, spec: Spec) -> Normalizer:
    """The normaliser shifted by the label's logit: one pass over the logits, no max pass.

    :math:`s = \\sum_k e^{z_k - z_y} \\ge 1` (the label's own term is 1), so
    :math:`\\log s = \\operatorname{lse}(z) - z_y` is the plain loss, non-negative and as
    precise as the max-shifted form. It is exact while every :math:`e^{z_k - z_y}` is finite,
    i.e. the label's logit is within ~88 (float32) of the row's maximum; a batch with a row
    beyond that, or without a finite label logit (ignored, out-of-range or impossible labels
    use the shift 0), falls back under a ``lax.cond`` to the max-shifted normaliser, which
    rebuilds the logits from the raw input (a cond operand is materialised) in row blocks.
    """
    label_shift = jnp.where(jnp.isfinite(label_logit), label_logit, 0.0)
    fast = shifted_normalizer(summable(raw, z, mask, spec), label_shift, spec)

    def by_peak(raw, rows_mask):
        block_mask = mask if class_mask else rows_mask
        capped = capped_logits(raw, block_mask, spec)
        peak = peak_shift(row_max(raw, capped, block_mask, spec))
        return tuple(shifted_normalizer(capped, peak, spec))

    class_mask = mask is not None and mask.ndim < raw.ndim  # the fused loss's [V]: not in rows
    selects = mask is not None or spec.logit_softcap is not None
    rows = None if class_mask else mask
    exact = lambda: Normalizer(*in_row_blocks(by_peak, raw, rows, blocked=selects))
    return if_all_finite(fast.log_sum, lambda: fast, exact)


def label_lookup(values, labels, spec: Spec, upcast=None):
    """``(values[..., label], held)``: an O(N) gather from the local slice, summed over shards.

    ``values`` is [..., K_local] (or [K_local]); ``labels`` the batch shape, or [..., k] (the
    entries of sparse labels: a value per entry); ``held`` counts the shards holding the label
    (0 for a label outside [0, K)). Shards that do not hold it contribute 0. ``upcast`` maps
    the gathered values (before the sum over shards).
    """
    num_local = values.shape[-1]
    local = labels - class_offset(num_local, spec)
    held = (local >= 0) & (local < num_local)
    index = jnp.clip(local, 0, num_local - 1)
    if values.ndim == 1:
        picked = jnp.take(values, index)
    elif index.ndim == values.ndim:  # k entries per row
        picked = jnp.take_along_axis(values, index, axis=-1)
    else:
        picked = jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0]
    if upcast is not None:
        picked = upcast(picked)
    picked = jnp.where(held, picked, jnp.zeros((), picked.dtype))
    return class_sum(picked, spec), class_sum(held.astype(jnp.int32), spec)
