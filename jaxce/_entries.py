"""The entries of sparse labels (and of integer labels, one entry each) in the backward pass:
their cotangents at O(N k) classes, gathered and written into ``dz`` by a scatter, never as an
[N, K] target."""

import jax
import jax.numpy as jnp
from jax import lax

from ._information import xdiff
from ._row_sums import from_bits, softcap, to_bits
from ._spec import SparseLabels, Spec, class_offset, class_sum


def sparse_outside(labels: SparseLabels, num_classes: int) -> jax.Array:
    """The rows with an entry of non-zero weight outside ``[0, num_classes)`` (NaN rows)."""
    outside = (labels.indices < 0) | (labels.indices >= num_classes)
    return jnp.any(outside & (labels.weights != 0), axis=-1)


def local_entries(indices, num_local: int, spec: Spec, columns=None):
    """``(index, held)``: the entries' indices into the local slice of classes (clipped into
    it) and whether it holds them; ``columns`` as in
    :func:`jaxce._row_cotangents.row_cotangents`."""
    offset = class_offset(num_local, spec) if columns is None else (
        columns[0] + class_offset(columns[1], spec)
    )
    local = indices - offset
    held = (local >= 0) & (local < num_local)
    return jnp.clip(local, 0, num_local - 1), held


def _entry_log_probs(raw, part, normalizer, spec: Spec):
    """``log p`` at the entries from their raw logits [..., k] (-inf off the possible ones)."""
    possible = part & (raw > -jnp.inf)
    return normalizer.log_probs(jnp.where(possible, softcap(raw, spec), -jnp.inf)), possible


def entry_weight_cotangents(raw, part, weight, normalizer, g_loss, bad, spec: Spec):
    r"""The cotangent of sparse labels' weights, [..., k]: :math:`-g (1 - \varepsilon)
    w_{i_j} \log p_{i_j}` (the loss is linear in them), from each entry's raw logit ``raw``
    in the slice of classes that holds it (``part``: held there and not masked; ``weight``:
    its class weight, or 1), summed over the class shards. 0 for an entry that takes no part,
    +inf for one on an impossible class (the dense loss's), NaN on the ``bad`` rows
    (:func:`sparse_outside`) that have a possible class (as their ``dz``).
    """
    log_p = _entry_log_probs(raw, part, normalizer, spec)[0]
    scale = (1.0 - spec.label_smoothing) * weight
    entry = jnp.where(part, xdiff(g_loss[..., None] * scale, 0.0, log_p), 0.0)
    entry = class_sum(entry, spec)
    return jnp.where((bad & (normalizer.log_sum > -jnp.inf))[..., None], jnp.nan, entry)


def _sum_duplicates(indices, a):
    """``sum_{j'} a_{j'} [i_{j'} = i_j]`` for each entry j of [..., k]: a loop over the k entries
    (a [..., k, k] comparison would be written out whole)."""
    def add(j, total):
        pick = lambda x: lax.dynamic_index_in_dim(x, j, axis=-1, keepdims=True)
        return total + jnp.where(indices == pick(indices), pick(a), 0.0)

    if indices.shape[-1] <= 1:  # (one entry has no duplicates)
        return a
    return lax.fori_loop(0, indices.shape[-1], add, 0.0 * a)


def entry_cotangents(dz, dweights, cotangent, gathered, labels: SparseLabels, mask,
                      class_weights, normalizer, num_possible, g_loss, bad, spec: Spec, columns):
    r"""The labels' share of the cotangents: their k entries, in O(N k).

    ``dz`` holds :func:`jaxce._row_cotangents.row_cotangents`' closed form without the
    entries' targets; ``gathered = (raw, index, held)`` the entries' logits, their indices into
    the local slice of classes and whether it holds them (:func:`local_entries`). At each
    entry's class the closed form is recomputed with its full target, ``cotangent(log p_c,
    t_c, ...)`` with :math:`t_c = w_c ((1 - \varepsilon) \sum_{j: i_j = c} a_j + \varepsilon /
    K_m)` (a_j the entry's weight where it takes part, see
    :func:`jaxce._row_stats._entry_logits`; duplicates add up, by a k x k comparison per row),
    and written over ``dz`` there by a scatter, in place,
    in ``dz``'s own dtype: no [N, K] target and, for bfloat16 logits, no float32 [N, K] ``dz``
    to round afterwards. ``dweights`` (class weights) gains
    :math:`-g (1 - \varepsilon) a_j \log p_{i_j}` at class :math:`i_j`; and the entries'
    weights get :func:`entry_weight_cotangents` (sparse labels, not with ``columns``).

    Integer labels come as one entry of weight 1 that is never masked away: on a masked
    class it keeps its target (the loss is +inf there, and so is its class weight's
    cotangent) while its class, impossible, gets ``dz = 0``.

    Each slice of classes (a shard, or the fused loss's tile of ``columns = (start, total)``)
    writes the entries it holds, from its own logits. A scatter measured 50x faster than
    summing k iota comparisons into the dense pass at N=4096, V=32768, k=32 on XLA:CPU
    (0.5 s against 25 s, which also wrote [N, V] temporaries).
    """
    num_local = dz.shape[-1]
    raw, index, held = gathered
    part = held
    unmasked = part
    if mask is not None:  # [..., K_local], or the fused loss's class mask [K_local]
        picked = jnp.take(mask, index) if mask.ndim == 1 else jnp.take_along_axis(mask, index, -1)
        unmasked = part & picked
        if spec.sparse_labels:
            part = unmasked
    weight = 1.0 if class_weights is None else jnp.take(class_weights, index)
    log_p, possible = _entry_log_probs(raw, unmasked, normalizer, spec)
    a = jnp.where(part, labels.weights, 0.0)
    u = (1.0 - spec.label_smoothing) * _sum_duplicates(labels.indices, a)
    if spec.label_smoothing:
        u = u + jnp.where(possible, spec.label_smoothing / jnp.maximum(num_possible, 1.0)[..., None],
                          0.0)
    capped = jnp.where(possible, softcap(raw, spec), -jnp.inf)
    values = cotangent(log_p, u * weight, capped, possible).astype(dz.dtype)
    # A 16-bit dz is scattered as bits (XLA:CPU would scatter into a float32 copy of dz, [N, K]
    # of temp memory, and round it afterwards).
    flat = to_bits(dz).reshape(-1, num_local)
    rows = lax.broadcasted_iota(jnp.int32, (flat.shape[0], index.shape[-1]), 0)
    target = jnp.where(held, index, num_local).reshape(rows.shape)  # out of bounds: dropped
    flat = flat.at[rows, target].set(to_bits(values).reshape(rows.shape), mode="drop")
    dz = from_bits(flat.reshape(dz.shape), values.dtype)
    if class_weights is not None:
        scale = g_loss[..., None] * (1.0 - spec.label_smoothing) * a
        entry = jnp.where(part, xdiff(scale, 0.0, log_p), 0.0)
        share = jnp.zeros(num_local, entry.dtype).at[index.reshape(-1)].add(
            entry.reshape(-1), mode="promise_in_bounds"
        )
        dweights = share if dweights is None else dweights + share
    dlabels = None
    if spec.sparse_labels and columns is None:
        dlabels = entry_weight_cotangents(raw, part, weight, normalizer, g_loss, bad, spec)
    return dz, dlabels, dweights
