r"""The row statistics of the logits ``x @ w + bias`` a tile of columns at a time.

A sweep over blocks of rows that hold every class reads all of ``w`` [D, V] once per block,
and a block's scratch (``rows x V``) caps its height as 1/V: at N=2048, D=256, V=262144 the
statistics read ``w`` 64 times and took 0.50x the naive step's time. Here the outer loop walks
tiles of columns and the inner one blocks of rows (as the column-tiled gradient sweep,
:func:`jaxce._tiles.tiled_grads`, does), so ``w`` is read once (0.21x there).

A tile gives each row *partial* statistics over its classes (:class:`Partial`): its largest
logit :math:`m`, :math:`s = \sum_k e^{z_k - m}`, label smoothing's sums relative to
:math:`m`, and the label's raw logit if the tile holds it. Two partials merge exactly, after
rebasing both onto the larger maximum :math:`M` (:math:`s\, e^{m - M}`, and the smoothing's
spread :math:`\sum_k w_k m_k (m - z_k)` gains :math:`W (M - m)`): online over the tiles, then
over the class shards. The merged partial is turned into :class:`~jaxce._row_stats.RowStats` by the
functions the in-place loss uses (:func:`~jaxce._row_stats.integer_label_stats`,
:func:`~jaxce._row_stats.sparse_label_stats`): the options live there, once. The normaliser is
shifted by the row's maximum.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._entries import local_entries
from ._normalizer import Normalizer, row_max
from ._options import Options
from ._row_stats import (
    RowStats,
    capped_entry_logits,
    capped_label_logit,
    integer_label_stats,
    smoothing_sums,
    sparse_label_stats,
)
from ._row_sums import capped_logits, sum_exp
from ._spec import Spec, class_max, class_sum
from ._sweeps import block_logits, row_blocks
from ._tiles import over_tiles
from ._validation import compute_dtype


class Partial(NamedTuple):
    """A row's statistics over some of its classes (each [..., ] or, for the label, [..., k])."""

    top: jax.Array  # the largest capped logit m, at least the lowest finite float
    sum_exp: jax.Array  # sum_k e^{z_k - m}
    smoothing: tuple | None  # (K_m, W_m, sum_k w_k m_k (m - z_k)) with label smoothing
    label: jax.Array  # the label's (entries') raw logit where held, else 0
    found: jax.Array  # int32: 1 where held


def _rebase(p: Partial, top) -> Partial:
    """``p`` relative to a maximum ``top >= p.top``."""
    smoothing = p.smoothing
    if smoothing is not None:
        count, weight, spread = smoothing
        smoothing = (count, weight, spread + weight * (top - p.top))
    return p._replace(top=top, sum_exp=p.sum_exp * jnp.exp(p.top - top), smoothing=smoothing)


def merge(a: Partial, b: Partial) -> Partial:
    """The statistics over the classes of ``a`` and ``b`` together."""
    top = jnp.maximum(a.top, b.top)
    a, b = _rebase(a, top), _rebase(b, top)
    return Partial(top, *jax.tree.map(jnp.add, tuple(a[1:]), tuple(b[1:])))


def merge_shards(p: Partial, spec: Spec) -> Partial:
    """The statistics over the classes of every shard."""
    if spec.class_axis_name is None:
        return p
    top = class_max(p.top, spec)
    p = _rebase(p, top)
    return Partial(top, *jax.tree.map(lambda a: class_sum(a, spec), tuple(p[1:])))


def tile_partial(raw, ids, mask, class_weights, fresh, columns, spec: Spec) -> Partial:
    """The :class:`Partial` of the raw logits ``raw`` [rows, cols] of the local classes
    ``[start, start + cols)`` (``columns = (start, V_local)``); ``ids`` [rows, k] the labels'
    (entries') global ids; ``mask`` and ``class_weights`` the tile's slices (or None);
    ``fresh`` (or None) [cols] the columns no tile before counted: the others take no part."""
    local = spec._replace(class_axis_name=None)  # the sums over the other shards come later
    index, held = local_entries(ids, raw.shape[-1], spec, columns)
    if fresh is not None:
        mask = fresh if mask is None else mask & fresh
        held &= jnp.take(fresh, index)
    z = capped_logits(raw, mask, local)
    top = jnp.maximum(row_max(raw, z, mask, local), jnp.finfo(z.dtype).min)
    smoothing = smoothing_sums(raw, z, mask, class_weights, top, local)
    # The label's raw logit: a masked or -inf class is found, then impossible (as in place).
    label = jnp.where(held, jnp.take_along_axis(raw, index, axis=-1), 0.0)
    return Partial(top, sum_exp(z, top), smoothing, label, held.astype(jnp.int32))


def stats_from_partial(p: Partial, labels, mask, class_weights, spec: Spec) -> RowStats:
    """The :class:`~jaxce._row_stats.RowStats` of the merged statistics over all classes."""
    normalizer = Normalizer(p.top, jnp.log(p.sum_exp))
    if spec.integer_labels:
        label_logit, found = capped_label_logit(p.label[..., 0], p.found[..., 0], labels, mask, spec)
        return integer_label_stats(
            labels, class_weights, label_logit, found, normalizer, p.top, p.smoothing, spec
        )
    entries = capped_entry_logits(p.label, p.found, labels, mask, spec)
    return sparse_label_stats(labels, class_weights, entries, normalizer, p.top, p.smoothing, spec)


def tiled_stats(x, w, bias, labels, mask, class_weights, opts: Options, tile) -> RowStats:
    """:class:`~jaxce._row_stats.RowStats` of ``x @ w + bias`` against integer or sparse labels,
    over tiles of ``cols`` columns and, inside each, blocks of ``rows`` rows (``tile = (rows,
    cols)``, :func:`jaxce._tiles.tile_shape`).

    A ragged last tile (block of rows) starts at ``V - cols`` (``N - rows``) and overlaps the
    one before: its overlapped columns take no part (its overlapped rows keep the statistics
    they had), so that every class of every row is counted once.
    """
    spec = opts.spec
    n, num_classes = x.shape[0], w.shape[1]
    rows, cols = min(tile[0], n), min(tile[1], num_classes)
    dtype = compute_dtype(jnp.result_type(x.dtype, w.dtype))
    ids = labels.indices if spec.sparse_labels else labels[:, None]
    at_rows = lambda a, start: lax.dynamic_slice_in_dim(a, start, rows)
    ragged = num_classes % cols != 0

    def tile_body(col, fresh, wt, bt, mt, cwt, acc):
        fresh = fresh if ragged else None  # (no select where no column is counted twice)

        def block_body(start, skip, acc):
            raw = block_logits(at_rows(x, start), wt, bt, dtype)
            part = tile_partial(raw, at_rows(ids, start), mt, cwt, fresh, (col, num_classes), spec)
            old = jax.tree.map(lambda a: at_rows(a, start), acc)
            new = merge(old, part)
            if n % rows:  # the rows the block before merged for this tile keep their statistics
                counted = lax.broadcasted_iota(jnp.int32, (rows,), 0) < skip
                new = jax.tree.map(
                    lambda o, v: jnp.where(counted.reshape((rows,) + (1,) * (v.ndim - 1)), o, v),
                    old, new,
                )
            return jax.tree.map(lambda a, v: lax.dynamic_update_slice_in_dim(a, v, start, 0), acc, new)

        return row_blocks(n, rows, block_body, acc)

    zeros = lambda shape=(n,), dtype=dtype: jnp.zeros(shape, dtype)
    acc = Partial(
        jnp.full((n,), jnp.finfo(dtype).min, dtype),
        zeros(),
        (zeros(), zeros(), zeros()) if spec.label_smoothing else None,
        zeros(ids.shape),
        zeros(ids.shape, jnp.int32),
    )
    if n and num_classes:
        acc = over_tiles(w, (bias, mask, class_weights), cols, tile_body, acc)
    return stats_from_partial(merge_shards(acc, spec), labels, mask, class_weights, spec)
