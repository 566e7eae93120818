r"""Softmax cross-entropy of a linear layer, ``x @ w + bias``, without the N x V logits.

A language model's last step, ``logits = x @ w`` for N tokens and V classes, makes the two
largest tensors of the whole training step: the logits and their gradient (N·V·4 bytes each,
8 GiB at N=4096, V=262144). :func:`linear_softmax_cross_entropy` never holds more than a block
of them, and the loss mathematics of :mod:`jaxce._row_stats`, :mod:`jaxce._row_cotangents` and
:mod:`jaxce._options` (``row_stats``, ``row_cotangents``, ``finish``) applies to each block
unchanged:

- with a scalar reduction (``"mean"``, ``"sum"``) the cotangent of every example's loss is
  known before any logit is computed (the reduction is linear in the per-example losses), so
  one pass over blocks of ``block_size`` rows holding *all* V (local) classes computes, per
  block, the logits :math:`z_b = x_b w + b` (one matmul), the loss and
  :math:`dz_b` in closed form, :math:`dx_b = dz_b w^\top` and :math:`dw \mathrel{+}= x_b^\top
  dz_b` (two matmuls): three matmuls in all, as the naive code. The backward pass only scales
  these by the upstream scalar (it recomputes the blocks only if the ``return_aux`` outputs are
  differentiated too);
- with ``reduction="none"``, a forward pass alone, and at large V, the statistics are taken
  over tiles of columns, merged online (:mod:`jaxce._tile_stats`, reading ``w`` once), the
  forward pass keeps only O(N) statistics (logsumexp and target mass), and the gradients come
  from a sweep over the same tiles that recomputes their logits (:mod:`jaxce._tiles`): four
  matmuls.

When each is taken, and how the blocks are walked, is in :mod:`jaxce._sweeps`.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from ._entries import entry_weight_cotangents, local_entries, sparse_outside
from ._options import (
    check_segments,
    check_weights,
    counted_rows,
    finish,
    integer_labels,
    make_options,
    sparse_labels,
)
from ._spec import SparseLabels, aval_varying_axes, class_shards, sum_like, vary_over
from ._sweeps import (
    cast_grads,
    default_block_size,
    fuses_gradients,
    linear_inputs,
    sweep_rows,
)
from ._tile_stats import tiled_stats
from ._tiles import tile_shape, tiled_grads
from ._validation import compute_dtype, static_number
from ._value_checks import check_labels, check_sparse_labels

ENTRY_BYTES = 16 * 2**20
"""The label weights' gradient of sparse labels gathers, per block of rows, the columns of ``w``
of its entries: about this many bytes (``rows x k x D``)."""


def _label_cotangent(x, w, bias, labels, mask, class_weights, opts, normalizer, g_loss):
    r"""The labels' cotangent: None for integer labels; for sparse labels their weights'
    (:func:`jaxce._entries.entry_weight_cotangents`), from the entries' logits
    :math:`x_n \cdot w_{:, i_j} + b_{i_j}` computed by gathering their k columns of ``w``
    (O(N k D), in blocks of rows): no sweep over the classes."""
    if not opts.spec.sparse_labels:
        return None
    spec = opts.spec
    n, d = x.shape
    num_local = w.shape[1]
    dtype = compute_dtype(jnp.result_type(x.dtype, w.dtype))
    index, part = local_entries(labels.indices, num_local, spec)
    k = index.shape[-1]

    def entry_logits(row):
        xr, ir = row
        z = lax.dot_general(xr, jnp.take(w, ir, axis=1), (((0,), (0,)), ((), ())),
                            preferred_element_type=dtype)
        return z if bias is None else z + jnp.take(bias, ir).astype(dtype)

    if n * k:
        rows = max(1, min(n, ENTRY_BYTES // (4 * max(k * d, 1))))
        raw = lax.map(entry_logits, (x, index), batch_size=rows)
    else:
        raw = jnp.zeros((n, k), dtype)
    if mask is not None:
        part = part & jnp.take(mask, index)
    weight = 1.0 if class_weights is None else jnp.take(class_weights, index)
    bad = sparse_outside(labels, num_local * class_shards(spec))
    dweights = entry_weight_cotangents(raw, part, weight, normalizer, g_loss, bad, spec)
    return SparseLabels(None, sum_like(dweights.astype(labels.weights.dtype), labels.weights))

# ----------------------------------------------------------------------------------------------
# reduction="none" (and the general case): per-example outputs, blocks recomputed backward.


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _rows(x, w, bias, labels, mask, class_weights, opts, block, tile, gradient_filter):
    loss, norm, _, _, correct = tiled_stats(x, w, bias, labels, mask, class_weights, opts, tile)
    return loss, norm.lse, correct


def _rows_fwd(x, w, bias, labels, mask, class_weights, opts, block, tile, gradient_filter):
    loss, *saved, correct = tiled_stats(x, w, bias, labels, mask, class_weights, opts, tile)
    return (loss, saved[0].lse, correct), (x, w, bias, labels, mask, class_weights, saved)


def _rows_bwd(opts, block, tile, gradient_filter, residuals, cotangents):
    x, w, bias, labels, mask, class_weights, saved = residuals
    g_loss, g_lse, _ = cotangents
    grads = tiled_grads(
        x, w, bias, labels, mask, class_weights, opts, tile, tuple(saved), g_loss, g_lse,
        (True, True, bias is not None), gradient_filter,
    )
    dx, dw, db, dcw = cast_grads(grads, x, w, bias, class_weights)
    dlabels = _label_cotangent(x, w, bias, labels, mask, class_weights, opts, saved[0], g_loss)
    return dx, dw, db, dlabels, None, dcw


_rows.defvjp(_rows_fwd, _rows_bwd)


# ----------------------------------------------------------------------------------------------
# Scalar reductions: loss and gradients in one pass; the backward pass scales them.


def _finish_fn(labels, counted, correct, opts):
    """``finish`` as a function of the differentiable inputs (the aux's ``correct`` left out)."""

    def fn(loss, lse, class_weights, sample_weights):
        out = finish(loss, lse, correct, labels, counted, class_weights, sample_weights, opts)
        if not opts.return_aux:
            return out, {}
        out, aux = out
        return out, {k: v for k, v in aux.items() if k != "correct"}

    return fn


def _example_cotangents(labels, counted, class_weights, sample_weights, opts, dtype):
    """d(reduced loss)/d(per-example loss): the reduction is linear in the losses."""
    # Zeros that vary like the labels do (inside shard_map, over the batch axis): the vjp then
    # gives each example its own cotangent instead of summing them over the batch shards.
    ids = labels.indices[..., :1].sum(-1) if opts.spec.sparse_labels else labels
    zeros = ids.astype(dtype) * 0
    fn = _finish_fn(labels, counted, zeros, opts._replace(return_aux=False))
    out, pull = jax.vjp(lambda loss: fn(loss, zeros, class_weights, sample_weights)[0], zeros)
    (g,) = pull(jnp.ones_like(out))
    return g


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _reduced(
    x, w, bias, labels, mask, class_weights, sample_weights, counted, opts, block, tile,
    gradient_filter,
):
    loss, norm, _, _, correct = tiled_stats(x, w, bias, labels, mask, class_weights, opts, tile)
    return finish(loss, norm.lse, correct, labels, counted, class_weights, sample_weights, opts)


def _value(p):
    return jax.tree.map(lambda leaf: leaf.value, p)


def _perturbed(p):
    return any(leaf.perturbed for leaf in jax.tree.leaves(p))


def _reduced_fwd(
    x, w, bias, labels, mask, class_weights, sample_weights, counted, opts, block, tile,
    gradient_filter,
):
    want = (_perturbed(x), _perturbed(w), _perturbed(bias))
    want_labels = opts.spec.sparse_labels and _perturbed(labels.weights)
    x, w, bias, labels, mask, class_weights, sample_weights, counted = map(
        _value, (x, w, bias, labels, mask, class_weights, sample_weights, counted)
    )
    g_loss = None  # gradients in the same pass, unless nothing needs them
    if any(want) or class_weights is not None:
        dtype = compute_dtype(x.dtype)
        g_loss = _example_cotangents(labels, counted, class_weights, sample_weights, opts, dtype)
    if g_loss is not None and fuses_gradients(w.shape[1], block, tile, w.dtype):
        (loss, *saved, correct), grads = sweep_rows(
            x, w, bias, labels, mask, class_weights, opts, block, g_loss, want, gradient_filter
        )
    else:  # statistics over tiles of columns, then the gradients likewise
        loss, *saved, correct = tiled_stats(x, w, bias, labels, mask, class_weights, opts, tile)
        grads = (None,) * 4
        if g_loss is not None:
            grads = tiled_grads(
                x, w, bias, labels, mask, class_weights, opts, tile, tuple(saved), g_loss, None,
                want, gradient_filter,
            )
    fn = _finish_fn(labels, counted, correct, opts)
    (out, aux), pull = jax.vjp(fn, loss, saved[0].lse, class_weights, sample_weights)
    if opts.return_aux and opts.spec.integer_labels:
        aux = {**aux, "correct": (correct > 0.5) & counted}
    result = (out, aux) if opts.return_aux else out
    inputs = (x, w, bias, labels, mask, class_weights, saved)
    return result, (grads, pull, inputs, want, want_labels)


def _reduced_bwd(opts, block, tile, gradient_filter, residuals, cotangents):
    grads, pull, inputs, want, want_labels = residuals
    x, w, bias, labels, mask, class_weights, saved = inputs
    g_out, g_aux = cotangents if opts.return_aux else (cotangents, {})
    g_aux = {k: v for k, v in g_aux.items() if k != "correct"}

    def instantiate(g, like):
        if not isinstance(g, SymbolicZero):
            return g
        # Inside shard_map, zeros that vary as the output does (the aux vary over the batch).
        return vary_over(jnp.zeros(like.shape, like.dtype), aval_varying_axes(g.aval))

    aux_is_zero = all(isinstance(g, SymbolicZero) for g in g_aux.values())
    g_out = instantiate(g_out, g_out)
    g_aux = {k: instantiate(g, g) for k, g in g_aux.items()}
    g_loss, g_lse, d_class_weights, d_sample_weights = pull((g_out, g_aux))
    if aux_is_zero:  # the usual case: d(out)/d(inputs) was computed forward, scale it
        dx, dw, db, dcw = (None if g is None else g_out.astype(g.dtype) * g for g in grads)
    else:  # the aux outputs are differentiated too: recompute the blocks with both cotangents
        dx, dw, db, dcw = tiled_grads(
            x, w, bias, labels, mask, class_weights, opts, tile, tuple(saved), g_loss, g_lse,
            want, gradient_filter,
        )
    if dcw is not None:
        dcw = dcw + d_class_weights
    dx, dw, db, dcw = cast_grads((dx, dw, db, dcw), x, w, bias, class_weights)
    dlabels = None
    if want_labels:
        dlabels = _label_cotangent(x, w, bias, labels, mask, class_weights, opts, saved[0], g_loss)
    return dx, dw, db, dlabels, None, dcw, d_sample_weights, None


_reduced.defvjp(_reduced_fwd, _reduced_bwd, symbolic_zeros=True)
# Under shard_map run eagerly (not jitted), JAX 0.10 cannot call a custom VJP with symbolic
# zeros (NotImplementedError); inside a jit it can, and under an outer jit this one is inlined.
_reduced_in_jit = jax.jit(_reduced, static_argnums=(8, 9, 10, 11))


# ----------------------------------------------------------------------------------------------


def linear_softmax_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    label_weights: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    base: float | None = None,
    reduction: str = "mean",
    return_aux: bool = False,
    block_size: int | None = None,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
    gradient_filter: float | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Softmax cross-entropy of the logits ``x @ w + bias`` against integer labels, blockwise.

    The same numbers as
    ``softmax_cross_entropy_with_integer_labels(x @ w + bias, labels, <same options>)``, and
    the same gradients with respect to ``x``, ``w``, ``bias`` (and the weights), without ever
    holding the N x V logits: the rows are processed in blocks of ``block_size``. With
    ``label_weights``, the loss against sparse labels instead:
    ``softmax_cross_entropy_with_sparse_labels(x @ w + bias, labels, label_weights, ...)``.

    Args:
      x: activations ``[..., D]`` (floating).
      w: the output layer ``[D, V]``, as in ``x @ w`` (a Flax ``Dense`` kernel).
      labels: integer class ids of ``x``'s batch shape ``x.shape[:-1]``; with
        ``label_weights``, the k class ids of each example, ``x.shape[:-1] + (k,)``.
      label_weights: optional floating ``x.shape[:-1] + (k,)``: the weight of each entry of
        ``labels`` (sparse labels, see :func:`jaxce.softmax_cross_entropy_with_sparse_labels`:
        an entry of weight 0 is padding, whatever its index; an entry of non-zero weight
        outside ``[0, V)`` makes the loss NaN). Differentiable: their gradient gathers the
        entries' k columns of ``w`` (O(N k D)), no pass over the classes. Without
        ``ignore_index``, and ``aux`` has no ``correct``.
      bias: optional ``[V]``.
      where: optional boolean ``[V]`` class mask (e.g. the padding columns of a vocabulary).
      ignore_index: examples whose label equals it get loss 0 and gradient 0, and do not
        count in ``"mean"``.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; targets become
        :math:`(1 - \varepsilon) y + \varepsilon / K` over the unmasked classes.
      class_weights: ``[V]``; weight :math:`w_k` multiplies class k's term (the mean divides
        by the counted examples' :math:`w_{y_n}`).
      sample_weights: ``x``'s batch shape; multiplies each example's loss.
      z_loss: :math:`\lambda_z \ge 0`; adds :math:`\lambda_z \operatorname{lse}(z)^2` per example.
      logit_softcap: :math:`c > 0`; logits pass through :math:`c \tanh(z / c)` first.
      base: logarithm base of the loss (``None`` nats, ``2`` bits).
      reduction: ``"mean"`` (default: over counted examples, 0 if none counts), ``"sum"``,
        ``"none"`` or ``"segment_mean"`` (as in
        :func:`~jaxce.softmax_cross_entropy_with_integer_labels`; its gradients come from the
        per-example path, the blocks recomputed backward).
      return_aux: also return a dict with per-example ``logsumexp``, the ``z_loss`` term and
        ``correct`` (the label's logit is the largest).
      block_size: rows per block; by default about :data:`~jaxce._sweeps.BLOCK_BYTES` of
        float32 temporaries (``block_size x V``), at least 8 rows.
      class_axis_name: inside ``shard_map``, the mesh axis over which ``w``'s V axis (and
        ``bias``, ``where``, ``class_weights``) is split in contiguous slices; ``dx`` is summed
        over it, ``dw`` stays local.
      batch_axis_name: the mesh axis over which the batch is split; ``"sum"`` and ``"mean"``
        become global.
      gradient_filter: skip backward work where the logits' cotangent is negligible (the
        gradient filtering of Cut Cross-Entropy): ``None`` (default) is exact; a threshold
        :math:`\tau \ge 0` skips, in each block of rows, every slab of columns (at most
        :data:`~jaxce._sweeps.FILTER_COLUMNS` wide) where all
        :math:`|dz_{nk}| < \tau\, g_n`, with :math:`g_n` the example's loss cotangent (plus
        the logsumexp's, if differentiated; :math:`dz_{nk} / g_n = p_{nk} - y_{nk}` for the
        plain loss: slabs where every probability is below :math:`\tau` and no label is
        likely less than :math:`1 - \tau`). A skipped slab adds nothing to ``dx`` and ``dw``:
        each of their entries moves by at most :math:`\tau \sum_n g_n |x_{ni}|` (``dw``) and
        :math:`\tau g_n \sum_k |w_{ik}|` (``dx``). The loss, ``bias``'s and the weights'
        gradients stay exact. Pays off on peaked (trained) softmaxes whose likely classes
        cluster in a few slabs (a vocabulary sorted by frequency); ``benchmarks/bench_linear.py``
        measures ``2**-12``.
      segment_ids: with ``"segment_mean"``, each example's segment id (the batch shape).
      num_segments: with ``"segment_mean"``, the number of segment ids (a static int).

    Returns:
      The loss in float32 (or wider): a scalar, or per example with ``reduction="none"``;
      with ``return_aux`` the pair ``(loss, aux)``.

    Note:
      With ``"mean"`` or ``"sum"`` the gradients are computed during the forward pass (the
      reduction's cotangent per example is known up front) and the backward pass only scales
      them; ``reduction="none"`` recomputes the blocks backward. Saved between the passes:
      the gradients themselves, or O(N) statistics. The matmuls run in the inputs' dtype with
      float32 accumulation (``preferred_element_type``); the gradient of ``w`` is accumulated
      in float32 (over blocks of rows, a ``[D, V]`` float32 buffer for bf16 ``w``; over tiles,
      each tile's columns, then stored) and returned in ``w``'s dtype.
      The statistics are taken over tiles of columns (``w`` read once) with
      ``reduction="none"``, for a forward pass alone, and wherever blocks of rows would be
      shorter than :data:`~jaxce._sweeps.FUSED_MIN_ROWS` (512) and the classes span more
      than one tile (from V=32768 at the default ``block_size``, or with fewer rows; 16-bit
      weights beyond one tile too); the gradients then come from a second sweep over the
      tiles (four matmuls instead of three, no ``dw`` traffic growing as V²).
      Forward mode (``jax.jvp``, ``jax.jacfwd``) is not defined for its custom VJP: use
      reverse mode.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
      >>> labels = jnp.array([0, 1])
      >>> print(jaxce.linear_softmax_cross_entropy(x, w, labels, reduction="none").round(5))
      [0.40761 1.40761]
      >>> print(jaxce.linear_softmax_cross_entropy(x, w, labels, block_size=1).round(5))
      0.90761
    """
    sparse = label_weights is not None
    if sparse and ignore_index is not None:
        raise ValueError(
            f"ignore_index={ignore_index!r} does not apply with label_weights (sparse labels): "
            "an entry of weight 0 is padding"
        )
    opts = make_options(
        integer_labels=not sparse,
        sparse_labels=sparse,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        base=base,
        reduction=reduction,
        return_aux=return_aux,
        ignore_index=ignore_index,
        class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name,
        segmented=True,
        num_segments=num_segments,
    )
    x, w, bias, mask, block_size = linear_inputs(x, w, bias, where, block_size, opts)
    num_classes = w.shape[1]
    batch_shape = x.shape[:-1]
    if sparse:
        names = ("labels", "label_weights")
        sparse_ids = sparse_labels(
            labels, label_weights, batch_shape, "x's batch shape", jnp.result_type(x, w), names
        )
        ignored = None
    else:
        ids, ignored = integer_labels(labels, batch_shape, "x's batch shape", opts.ignore_index)
    filt = static_number("gradient_filter", gradient_filter, optional=True)
    if filt is not None and not 0 <= filt < float("inf"):
        raise ValueError(f"gradient_filter must be a finite float >= 0 or None, got {filt!r}")
    class_weights, sample_weights = check_weights(
        class_weights, sample_weights, num_classes, batch_shape, jnp.result_type(x, w)
    )
    mesh_axes = {"class_axis_name": class_axis_name, "batch_axis_name": batch_axis_name}
    mesh_axes["taking_part"] = lambda: counted_rows(mask, None, batch_shape, opts.spec)
    if sparse:
        check_sparse_labels(labels, label_weights, num_classes, names=names, **mesh_axes)
    else:
        check_labels(labels, num_classes, ignore_index=opts.ignore_index, **mesh_axes)
    n = math.prod(batch_shape)
    block = block_size or default_block_size(n, num_classes)
    tile = tile_shape(n, x.shape[-1], num_classes, block)
    x2 = x.reshape(n, x.shape[-1])
    if sparse:
        k = sparse_ids.indices.shape[-1]
        y = jax.tree.map(lambda a: a.reshape(n, k), sparse_ids)
    else:
        y = ids.reshape(n)
    sw = None if sample_weights is None else sample_weights.reshape(n)
    counted = counted_rows(mask, None if ignored is None else ignored.reshape(n), (n,), opts.spec)
    segments = check_segments(segment_ids, batch_shape, opts)
    if segments is not None:
        segments = (segments[0].reshape(n), segments[1])
    if opts.reduction in ("none", "segment_mean"):  # per-example losses, recomputed backward
        loss, lse, correct = _rows(x2, w, bias, y, mask, class_weights, opts, block, tile, filt)
        out = finish(loss, lse, correct, y, counted, class_weights, sw, opts, segments)
    else:
        out = _reduced_in_jit(
            x2, w, bias, y, mask, class_weights, sw, counted, opts, block, tile, filt
        )
    unflat = lambda a: a.reshape(batch_shape) if a.ndim == 1 else a
    return jax.tree.map(unflat, out)
