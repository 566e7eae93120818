r"""Distillation of a linear layer's softmax, ``x @ w + bias``, without the N x V logits.

The forward pass walks over the rows in blocks (:func:`jaxce._sweeps.row_block_outputs`):
each block's student logits :math:`z_b = x_b w + b` (one matmul) and the teacher's logits of
the same rows (read from the given array, or computed from the teacher's head: one more
matmul) give the row mathematics of :mod:`jaxce._divergence` (both normalisers, the
divergence and the row sums its gradient needs), and only those O(N) numbers are kept. The
backward pass is the cross-entropy's column-tiled gradient sweep
(:func:`jaxce._tiles.tiled_grads`) with the student's closed-form cotangent on each tile of
columns: the student's logits are recomputed (and the teacher's, from its head), four
matmuls in all (five with a teacher head), against the naive code's three (four).
"""

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._divergence import (
    DivergenceSpec,
    RowSums,
    divergence_options,
    log_softmax,
    normalizer,
    pulled,
    row_sums,
    student_cotangent,
)
from ._options import Options, check_segments, check_weights, counted_rows, finish
from ._sweeps import (
    block_logits,
    cast_grads,
    default_block_size,
    linear_inputs,
    row_block_outputs,
)
from ._tiles import tile_shape, tiled_grads
from ._validation import check_floating, check_shape, compute_dtype
from ._value_checks import check_finite


def _teacher_inputs(teacher, batch_shape, num_classes, class_axis_name):
    """The teacher as ``(logits [n, V], None, None)`` or its head ``(x_t [n, D_t], w_t, b_t)``,
    checked against the student's batch shape and classes."""
    if isinstance(teacher, Sequence) and not isinstance(teacher, str):
        if len(teacher) not in (2, 3):
            raise ValueError(
                "teacher must be logits or a tuple (teacher_x, teacher_w[, teacher_bias]), got "
                f"a sequence of {len(teacher)}"
            )
        parts = [jnp.asarray(a) for a in teacher]
        tx, tw, tb = parts[0], parts[1], parts[2] if len(parts) == 3 else None
        for name, a in (("teacher_x", tx), ("teacher_w", tw)):
            check_floating(name, a)
        check_shape("teacher_x", tx, batch_shape + tx.shape[-1:], "x's batch shape + (D_t,)")
        check_shape("teacher_w", tw, (tx.shape[-1], num_classes), "[D_t, V] with w's V")
        if tb is not None:
            check_floating("teacher_bias", tb)
            check_shape("teacher_bias", tb, (num_classes,), "w's classes")
        check_finite("teacher_x", tx, allow_neg_inf=False)
        check_finite("teacher_w", tw, allow_neg_inf=False, class_axis_name=class_axis_name)
        return tx.reshape(-1, tx.shape[-1]), tw, tb
    logits = jnp.asarray(teacher)
    check_floating("teacher", logits)
    check_shape("teacher", logits, batch_shape + (num_classes,), "x's batch shape + (V,)")
    check_finite("teacher", logits, class_axis_name=class_axis_name)
    return logits.reshape(-1, num_classes), None, None


def _teacher_logits(rows, teacher_w, teacher_bias, columns=None):
    """The teacher's logits of a block of ``rows`` (logits, or ``x_t`` with a head), on the
    column slice ``columns = (start, size)`` or all of them."""
    if teacher_w is None:
        return rows if columns is None else lax.dynamic_slice_in_dim(rows, *columns, axis=1)
    if columns is not None:
        teacher_w = lax.dynamic_slice_in_dim(teacher_w, *columns, axis=1)
        if teacher_bias is not None:
            teacher_bias = lax.dynamic_slice_in_dim(teacher_bias, *columns, axis=0)
    dtype = compute_dtype(jnp.result_type(rows.dtype, teacher_w.dtype))
    return block_logits(rows, teacher_w, teacher_bias, dtype)


def _sweep(x, w, bias, teacher, mask, spec: DivergenceSpec, block: int):
    """Each row's normalisers and :class:`RowSums` [N], a block of rows at a time."""
    rows_in, teacher_w, teacher_bias = teacher
    n = x.shape[0]
    dtype = compute_dtype(jnp.result_type(x.dtype, w.dtype))
    size = min(block, n)

    def block_fn(start):
        z_s = block_logits(lax.dynamic_slice_in_dim(x, start, size), w, bias, dtype)
        rows = lax.dynamic_slice_in_dim(rows_in, start, size)
        z_t = _teacher_logits(rows, teacher_w, teacher_bias)
        norm_s, norm_t = normalizer(z_s, mask, spec), normalizer(z_t, mask, spec)
        log_ps = log_softmax(z_s, mask, *norm_s, spec)
        log_pt = log_softmax(z_t, mask, *norm_t, spec)
        return (*norm_s, *norm_t, *row_sums(log_ps, log_pt, spec))

    return row_block_outputs(n, size, block_fn, 4 + len(RowSums._fields), dtype)


def _tile_cotangents(spec, teacher, z, rows, mask, class_weights, stats, g, g_unused, columns):
    """A tile's ``(dz, None)`` for :func:`jaxce._tiles.tiled_grads`: the student's cotangent
    on the columns ``[start, start + cols)``, given the rows' saved statistics."""
    _, teacher_w, teacher_bias = teacher
    shift_s, log_sum_s, shift_t, log_sum_t, *sums = stats
    start = columns[0]
    z_t = _teacher_logits(rows, teacher_w, teacher_bias, (start, z.shape[-1]))
    log_ps = log_softmax(z, mask, shift_s, log_sum_s, spec)
    log_pt = log_softmax(z_t, mask, shift_t, log_sum_t, spec)
    dz = student_cotangent(log_ps, log_pt, RowSums(*sums), spec)
    return pulled(dz, g, z.dtype, spec), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused(x, w, bias, teacher, mask, spec: DivergenceSpec, opts: Options, block, tile):
    return _sweep(x, w, bias, teacher, mask, spec, block)[4]


def _fused_fwd(x, w, bias, teacher, mask, spec, opts, block, tile):
    stats = _sweep(x, w, bias, teacher, mask, spec, block)
    return stats[4], (x, w, bias, teacher, mask, stats)


def _fused_bwd(spec, opts, block, tile, residuals, g):
    x, w, bias, teacher, mask, stats = residuals
    grads = tiled_grads(
        x, w, bias, teacher[0], mask, None, opts, tile, stats, g, None,
        (True, True, bias is not None),
        cotangents=functools.partial(_tile_cotangents, spec, teacher),
    )
    dx, dw, db, _ = cast_grads(grads, x, w, bias, None)
    return dx, dw, db, jax.tree.map(jnp.zeros_like, teacher), None  # the teacher: no gradient


_fused.defvjp(_fused_fwd, _fused_bwd)


def linear_softmax_divergence(
    x: ArrayLike,
    w: ArrayLike,
    teacher: ArrayLike | tuple,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    base: float | None = None,
    reduction: str = "mean",
    block_size: int | None = None,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> jax.Array:
    r"""The divergence of :func:`jaxce.softmax_divergence` for the student logits
    ``x @ w + bias``, blockwise: distillation into a model's head without its N x V logits.

    The same numbers as ``softmax_divergence(x @ w + bias, teacher_logits, <same options>)``
    and the same gradients with respect to ``x``, ``w`` and ``bias``, with the rows processed
    in blocks of ``block_size``. The teacher gets no gradient (its outputs are the targets).

    Args:
      x: the student's activations ``[..., D]`` (floating).
      w: the student's output layer ``[D, V]``, as in ``x @ w``.
      teacher: the teacher's logits ``[..., V]`` (``x``'s batch shape; any floating dtype,
        read a block of rows at a time), or its head as a tuple ``(teacher_x, teacher_w)`` or
        ``(teacher_x, teacher_w, teacher_bias)`` (``[..., D_t]``, ``[D_t, V]``, ``[V]``),
        whose logits are computed a block at a time and never held whole.
      kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: the JSD's weight :math:`\beta \in (0, 1)` of the teacher.
      temperature: :math:`\tau > 0`; both logits are divided by it (no :math:`\tau^2`).
      bias: optional ``[V]`` of the student; a :math:`-\infty` entry makes its class
        impossible.
      where: optional boolean ``[V]`` class mask: masked classes take no part in either
        softmax.
      sample_weights: ``x``'s batch shape; multiplies each example's divergence.
      base: logarithm base (``None`` nats, ``2`` bits, ``10`` hartleys).
      reduction: ``"mean"`` (default), ``"sum"``, ``"none"`` or ``"segment_mean"``, as in
        :func:`jaxce.softmax_divergence`.
      block_size: rows per block; by default about :data:`~jaxce._sweeps.BLOCK_BYTES` of
        float32 temporaries for the two ``block_size x V`` blocks of logits.
      class_axis_name: inside ``shard_map``, the mesh axis over which the V axis of ``w``
        (and of ``bias``, ``where`` and the teacher's logits or ``teacher_w``) is split in
        contiguous slices; ``dx`` is summed over it, ``dw`` stays local.
      batch_axis_name: the mesh axis over which the batch is split; ``dw`` and ``dbias`` are
        summed over it, and ``"sum"``, ``"mean"`` and ``"segment_mean"`` become global.
      segment_ids: with ``"segment_mean"``, each example's segment id (the batch shape).
      num_segments: with ``"segment_mean"``, the number of segment ids (a static int).

    Returns:
      The divergence in float32 (or wider): a scalar, or per example with
      ``reduction="none"``.

    Note:
      The forward pass keeps O(N) statistics (both normalisers, the divergence and the sums
      its gradient needs); the backward pass recomputes the student's logits (and the
      teacher's, from a head) tile by tile, with the student's closed-form cotangent (for the
      forward KL :math:`(p_s - p_t) / \tau`): four matmuls, five with a teacher head.
      Temporaries stay a few ``block_size x V`` float32 arrays, flat in V. :math:`-\infty`
      logits: as :func:`jaxce.softmax_divergence`. Forward mode is not defined for its
      custom VJP: use ``jax.grad`` or ``jax.vjp``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
      >>> teacher = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
      >>> print(jaxce.linear_softmax_divergence(x, w, teacher, reduction="none").round(5))
      [0.12329 0.17685]
      >>> print(jaxce.linear_softmax_divergence(x, w, (x, 0.5 * w), kind="jsd").round(5))
      0.01573
    """
    spec, opts = divergence_options(
        kind, beta, temperature, base, reduction, class_axis_name, batch_axis_name, num_segments
    )
    x, w, bias, mask, block_size = linear_inputs(x, w, bias, where, block_size, opts)
    num_classes = w.shape[1]
    batch_shape = x.shape[:-1]
    teacher = _teacher_inputs(teacher, batch_shape, num_classes, class_axis_name)
    _, sample_weights = check_weights(None, sample_weights, num_classes, batch_shape)
    n = math.prod(batch_shape)
    block = block_size or default_block_size(n, 2 * num_classes)  # two blocks of logits
    tile = tile_shape(n, x.shape[-1], num_classes, block)
    loss = _fused(x.reshape(n, x.shape[-1]), w, bias, teacher, mask, spec, opts, block, tile)
    counted = counted_rows(mask, None, (n,), opts.spec)
    sw = None if sample_weights is None else sample_weights.reshape(n)
    segments = check_segments(segment_ids, batch_shape, opts)
    if segments is not None:
        segments = (segments[0].reshape(n), segments[1])
    out = finish(loss, None, None, None, counted, None, sw, opts, segments)
    return out.reshape(batch_shape) if opts.reduction == "none" else out
