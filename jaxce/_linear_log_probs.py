r"""Label log-probabilities and entropies of a linear layer's tempered softmax, ``x @ w + bias``,
without the N x V logits.

The forward pass walks over the rows in blocks (the walker of :mod:`jaxce._sweeps`): each
block's logits :math:`z_b = x_b w + b` (one matmul) give the row statistics of
:mod:`jaxce._log_probs` (the maximum :math:`M`, :math:`\log s`, the entropy and the label's
logit), and only those O(N) numbers are kept. The cotangents of the two outputs are unknown
until the backward pass, which therefore recomputes the logits: it is the cross-entropy's
column-tiled gradient sweep (:func:`jaxce._tiles.tiled_grads`) with the log-probabilities'
closed-form cotangents, :math:`dx_b \mathrel{+}= dz\, w_t^\top` and :math:`dw_t = \sum_b
x_b^\top dz`. Four matmuls in all, one more than the naive code's three.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._log_probs import (
    LogProbSpec,
    class_sums,
    label_capped_logit,
    label_cotangents,
    label_log_prob,
    make_log_prob_spec,
)
from ._options import Options, counted_rows, integer_labels
from ._row_sums import in_row_blocks
from ._sweeps import (
    block_logits,
    cast_grads,
    default_block_size,
    linear_inputs,
    row_block_outputs,
)
from ._tiles import tile_shape, tiled_grads
from ._validation import compute_dtype
from ._value_checks import check_labels


def _sweep(x, w, bias, labels, mask, ls: LogProbSpec, block: int):
    """``(log_prob, entropy, M, log s)`` [N] of the rows of ``x`` [N, D], a block at a time."""
    n = x.shape[0]
    dtype = compute_dtype(jnp.result_type(x.dtype, w.dtype))
    size = min(block, n)

    def block_fn(start):
        xb = lax.dynamic_slice_in_dim(x, start, size)
        yb = lax.dynamic_slice_in_dim(labels, start, size)
        z = block_logits(xb, w, bias, dtype)
        capped_y, found = label_capped_logit(z, yb, mask, ls)
        # The entropy's two sums share the exponentials, which XLA:CPU writes out whole: in
        # smaller blocks of rows (see in_row_blocks) that scratch is a fraction of the block's.
        sums = lambda z: class_sums(z, mask, ls, in_blocks=ls.entropy)
        shift, log_sum, entropy = in_row_blocks(sums, z, blocked=ls.entropy)
        return label_log_prob(capped_y, found, shift, log_sum, ls), entropy, shift, log_sum

    return row_block_outputs(n, size, block_fn, 4, dtype)


def _tile_cotangents(ls, z, labels, mask, class_weights, stats, g_log_prob, g_entropy, columns):
    """A tile's ``(dz, None)`` for :func:`jaxce._tiles.tiled_grads` (no class weights)."""
    return label_cotangents(z, labels, mask, stats, g_log_prob, g_entropy, ls, columns), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fused(x, w, bias, labels, mask, ls: LogProbSpec, opts: Options, block, tile):
    log_prob, entropy, _, _ = _sweep(x, w, bias, labels, mask, ls, block)
    return log_prob, entropy


def _fused_fwd(x, w, bias, labels, mask, ls, opts, block, tile):
    log_prob, entropy, shift, log_sum = _sweep(x, w, bias, labels, mask, ls, block)
    return (log_prob, entropy), (x, w, bias, labels, mask, (shift, log_sum, entropy))


def _fused_bwd(ls, opts, block, tile, residuals, cotangents):
    x, w, bias, labels, mask, stats = residuals
    g_log_prob, g_entropy = cotangents
    grads = tiled_grads(
        x, w, bias, labels, mask, None, opts, tile, stats, g_log_prob, g_entropy,
        (True, True, bias is not None), cotangents=functools.partial(_tile_cotangents, ls),
    )
    dx, dw, db, _ = cast_grads(grads, x, w, bias, None)
    return dx, dw, db, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def linear_label_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    return_entropy: bool = False,
    block_size: int | None = None,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Label log-probabilities (and entropies) of the tempered softmax of ``x @ w + bias``,
    blockwise.

    The same numbers as ``label_log_probs(x @ w + bias, labels, <same options>)``, and the
    same gradients with respect to ``x``, ``w`` and ``bias``, without ever holding the N x V
    logits: the rows are processed in blocks of ``block_size``. For a policy's last layer in
    RL fine-tuning (GRPO, PPO): the log-probabilities of the sampled tokens and the
    entropies, per token, at a vocabulary's scale.

    Args:
      x: activations ``[..., D]`` (floating).
      w: the output layer ``[D, V]``, as in ``x @ w`` (a Flax ``Dense`` kernel).
      labels: integer class ids of ``x``'s batch shape ``x.shape[:-1]``.
      bias: optional ``[V]``; a :math:`-\infty` entry makes its class impossible.
      temperature: :math:`\tau > 0` (a static, finite number); the softmax of the logits
        divided by it (after the soft-cap).
      logit_softcap: :math:`c \in (0, 2^{100}]`; logits pass through :math:`c \tanh(z / c)`
        first.
      where: optional boolean ``[V]`` class mask (e.g. the padding columns of a vocabulary).
      ignore_index: examples whose label equals it give log-probability 0, entropy 0 and
        gradient 0.
      return_entropy: also return the entropy of each example's tempered softmax.
      block_size: rows per block; by default about :data:`~jaxce._sweeps.BLOCK_BYTES` of
        float32 temporaries (``block_size x V``), at least 8 rows.
      class_axis_name: inside ``shard_map``, the mesh axis over which ``w``'s V axis (and
        ``bias``, ``where``) is split in contiguous slices; labels are global ids; ``dx`` is
        summed over it, ``dw`` stays local.
      batch_axis_name: inside ``shard_map``, the mesh axis over which the batch (``x``,
        ``labels``) is split: ``dw`` and ``dbias`` are summed over it.

    Returns:
      The log-probabilities of ``x``'s batch shape, in float32 (float64 for float64 inputs);
      with ``return_entropy`` the pair ``(log_probs, entropy)``.

    Note:
      The forward pass keeps O(N) statistics (:math:`\max_k z'_k`, :math:`\log s`, the
      entropy); since the outputs' cotangents are unknown until the backward pass, it
      recomputes the blocks' logits: one more matmul per block than the forward, four in all
      (as ``reduction="none"`` of :func:`jaxce.linear_softmax_cross_entropy`, whose
      column-tiled gradient sweep it shares). Temporaries stay a few ``block_size x V``
      float32 arrays, flat in V; the gradient of ``w`` is accumulated in a ``[D, V]``
      float32 buffer and returned in ``w``'s dtype. The matmuls run in the inputs' dtype
      with float32 accumulation. :math:`-\infty` logits, ``ignore_index``, labels on
      impossible classes and out of range: as :func:`jaxce.label_log_probs`. Forward mode
      (``jax.jvp``, ``jax.jacfwd``) is not defined for its custom VJP: use ``jax.grad`` or
      ``jax.vjp``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxce
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
      >>> labels = jnp.array([0, 1])
      >>> log_p, h = jaxce.linear_label_log_probs(x, w, labels, return_entropy=True)
      >>> print(log_p.round(5), h.round(5))
      [-0.40761 -1.40761] [0.8324 0.8324]
      >>> advantages = jnp.array([1.0, -0.5])
      >>> objective = lambda w: jnp.sum(advantages * jaxce.linear_label_log_probs(
      ...     x, w, labels, temperature=0.5, block_size=1))
      >>> print(jax.grad(objective)(w).tolist())
      [[0.26637, -0.23462, -0.03175], [0.01588, -0.88269, 0.86681]]
    """
    opts, ls = make_log_prob_spec(
        temperature, logit_softcap, return_entropy, ignore_index, class_axis_name,
        batch_axis_name,
    )
    x, w, bias, mask, block_size = linear_inputs(x, w, bias, where, block_size, opts)
    num_classes = w.shape[1]
    batch_shape = x.shape[:-1]
    ids, ignored = integer_labels(labels, batch_shape, "x's batch shape", opts.ignore_index)
    check_labels(
        labels, num_classes, ignore_index=opts.ignore_index, class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name,
        taking_part=lambda: counted_rows(mask, None, batch_shape, opts.spec),
    )
    n = ids.size
    block = block_size or default_block_size(n, num_classes)
    tile = tile_shape(n, x.shape[-1], num_classes, block)
    log_probs, entropy = _fused(
        x.reshape(n, x.shape[-1]), w, bias, ids.reshape(n), mask, ls, opts, block, tile
    )
    counted = counted_rows(mask, None if ignored is None else ignored.reshape(n), (n,), opts.spec)
    log_probs = jnp.where(counted, log_probs, 0.0).reshape(batch_shape)
    if not return_entropy:
        return log_probs
    return log_probs, jnp.where(counted, entropy, 0.0).reshape(batch_shape)
