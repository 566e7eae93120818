"""The softmax cross-entropies on logits held in place (labels as distributions, integer
class ids, k weighted class ids, or log-probabilities), and the Hessian-vector product of the
softmax cross-entropy."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._options import (
    Options,
    check_segments,
    check_varying,
    check_weights,
    counted_rows,
    example_mask,
    finish,
    integer_labels,
    label_class_weights,
    left_out_rows,
    logits_in_rows,
    make_options,
    sparse_labels,
    with_option_doc,
)
from ._rows import row_losses
from ._softmax import finite_or_zero, masked_fill, move_axes_last, prepare, probabilities
from ._validation import (
    check_floating,
    check_shape,
    compute_dtype,
)
from ._value_checks import check_distribution, check_finite, check_labels, check_sparse_labels


def _in_place_loss(
    z, labels, mask, ignored, batch_shape, class_weights, sample_weights, opts: Options,
    segments=None, examples=None,
):
    """The in-place path of the softmax cross-entropies, from logits moved to [..., K].

    ``examples``: a mask of the batch shape (``where`` constant over the classes), or None.
    Its rows are left out as ignored ones are, with no [..., K] mask; their logsumexp in the
    aux is -inf, as for a row whose every class is masked.
    """
    check_varying(opts, ("logits", z), ("logits", z))
    class_weights, sample_weights = check_weights(
        class_weights, sample_weights, z.shape[-1], batch_shape, z.dtype
    )
    ignored = left_out_rows(ignored, examples)
    if examples is not None:
        if opts.spec.integer_labels:
            labels = jnp.where(ignored, 0, labels)  # (a padding label: no NaN, as ignored ones)
        elif opts.spec.sparse_labels:
            labels = labels._replace(weights=jnp.where(examples[..., None], labels.weights, 0.0))
    counted = counted_rows(mask, ignored, batch_shape, opts.spec)
    rows = None if ignored is None else counted
    loss, lse, correct = row_losses(z, labels, mask, rows, class_weights, opts.spec)
    if examples is not None:
        lse = jnp.where(examples, lse, -jnp.inf)
    return finish(
        loss, lse, correct, labels, counted, class_weights, sample_weights, opts, segments
    )


@with_option_doc
def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    base: float | None = None,
    reduction: str = "none",
    return_aux: bool = False,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Softmax cross-entropy against label distributions: :math:`-\sum_k y_k \log p_k`.

    Args:
      logits: floating logits; ``axis`` holds the K classes.
      labels: probabilities of the same shape (differentiable: distillation works).
      axis: the class axis or axes (several are flattened, C order, in the order given).
{options}
    Returns:
      The loss in float32 (or wider): per example (the batch shape) or a scalar; with
      ``return_aux`` the pair ``(loss, aux)``.

    Note:
      The backward pass is the closed form :math:`g (p \sum_k y_k - y)` for the logits and
      :math:`-g \log p` for the labels, from a custom VJP that keeps only the logits, the
      labels and the logsumexp. A :math:`-\infty` logit whose label is 0 gives a finite loss
      and zero gradient (optax gives NaN there); a :math:`+\infty` logit gives NaN.
      bf16/f16 logits are computed in float32; the gradient has the logits' dtype.
      Forward mode (``jax.jvp``, ``jax.jacfwd``) is not defined for a custom VJP and raises
      JAX's error; use reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``);
      ``jax.hessian`` (forward over reverse) works.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([2.0, 1.0, 0.0])
      >>> print(jaxce.softmax_cross_entropy(logits, jnp.array([1.0, 0.0, 0.0])))
      0.407606
      >>> print(jaxce.softmax_cross_entropy(logits, jnp.array([1.0, 0.0, 0.0]), base=10))
      0.177021
    """
    opts = make_options(
        integer_labels=False,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        base=base,
        reduction=reduction,
        return_aux=return_aux,
        class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name,
        segmented=True,
        num_segments=num_segments,
    )
    logits_in = jnp.asarray(logits)
    examples, class_where = example_mask(logits_in, axis, where, opts)
    z, mask, axes, batch_shape = logits_in_rows(logits_in, axis, class_where, opts)
    labels = jnp.asarray(labels)
    check_floating("labels", labels)
    check_shape("labels", labels, logits_in.shape, "logits shape")
    mesh_axes = {"class_axis_name": class_axis_name, "batch_axis_name": batch_axis_name}
    check_finite("logits", logits_in, axes, where=where, **mesh_axes)
    check_distribution("labels", labels, axes, where=where, **mesh_axes)
    y = move_axes_last(labels, axes)
    segments = check_segments(segment_ids, batch_shape, opts)
    return _in_place_loss(
        z, y, mask, None, batch_shape, class_weights, sample_weights, opts, segments, examples
    )


@with_option_doc
def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    base: float | None = None,
    reduction: str = "none",
    return_aux: bool = False,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Softmax cross-entropy against integer labels: :math:`\operatorname{lse}(z) - z_y`.

    Args:
      logits: floating logits; ``axis`` holds the K classes.
      labels: integer class ids of the batch shape (the logits' shape without ``axis``; with
        several class axes, a flat C-order index into them in the order ``axis`` lists them,
        as optax: ``axis=(3, 2)`` makes axis 3 the major one).
      axis: the class axis or axes.
      ignore_index: examples whose label equals it get loss 0 and gradient 0, and do not
        count in ``"mean"``.
{options}
    Returns:
      The loss in float32 (or wider): per example or a scalar; with ``return_aux`` the pair
      ``(loss, aux)``. With ``class_weights`` and ``"mean"`` the mean divides by the sum of
      the counted examples' :math:`w_{y_n}` (times their sample weights): PyTorch's semantics.

    Note:
      The backward pass is :math:`g (p - t)` from a custom VJP, the target t built by comparing
      an iota with the labels (no one-hot). Labels of any integer dtype are compared
      exactly (K and ``ignore_index`` never wrap in a narrow dtype); int64 NumPy labels beyond
      int32 raise while 64-bit types are disabled (JAX would truncate them). A label outside
      ``[0, K)`` that is not ``ignore_index`` gives a NaN loss and a NaN gradient row (never
      a silent wrap to another class; :func:`jaxce.checked` raises instead); a label on a
      masked class or a :math:`-\infty` logit, or in a row whose logits are all
      :math:`-\infty`, has probability 0 and gives :math:`+\infty`; its gradient stays the
      closed form :math:`p - y`, i.e. :math:`p` (0 for a row whose logits are all
      :math:`-\infty`). A
      :math:`-\infty` logit is an impossible class, treated like a masked one: label
      smoothing puts no mass on it.
      Forward mode (``jax.jvp``, ``jax.jacfwd``) is not defined for a custom VJP and raises
      JAX's error; use reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``);
      ``jax.hessian`` (forward over reverse) works.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
      >>> print(jaxce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])).round(5))
      [0.40761 1.40761]
      >>> print(jaxce.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, reduction="mean"))
      0.407606
    """
    opts = make_options(
        integer_labels=True,
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
    examples, class_where = example_mask(logits, axis, where, opts)
    z, mask, axes, batch_shape = logits_in_rows(logits, axis, class_where, opts)
    what = f"logits shape without axis {axis}"
    ids, ignored = integer_labels(labels, batch_shape, what, opts.ignore_index)
    check_finite(
        "logits", logits, axes, where=where,
        class_axis_name=class_axis_name, batch_axis_name=batch_axis_name,
    )
    taking_part = lambda: counted_rows(mask, left_out_rows(None, examples), batch_shape, opts.spec)
    check_labels(
        labels, z.shape[-1], ignore_index=opts.ignore_index, class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name, taking_part=taking_part,
    )
    segments = check_segments(segment_ids, batch_shape, opts)
    return _in_place_loss(
        z, ids, mask, ignored, batch_shape, class_weights, sample_weights, opts, segments,
        examples,
    )


@with_option_doc
def softmax_cross_entropy_with_sparse_labels(
    logits: ArrayLike,
    label_indices: ArrayLike,
    label_weights: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    base: float | None = None,
    reduction: str = "none",
    return_aux: bool = False,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""Softmax cross-entropy against sparse labels: :math:`-\sum_j a_j \log p_{i_j}`.

    The labels are the distribution (or any non-negative target) that puts weight
    :math:`a_j` on class :math:`i_j` for the k entries :math:`j` of an example: the cached
    top-k of a teacher's probabilities (distillation), or a few positive classes (multi-label
    targets). Value and gradients are those of :func:`softmax_cross_entropy` on the dense
    labels :math:`y_c = \sum_j a_j [i_j = c]`, for every option, without building them.

    Args:
      logits: floating logits; ``axis`` holds the K classes.
      label_indices: integer class ids of shape ``batch_shape + (k,)`` (the batch shape is
        the logits' shape without ``axis``; with several class axes, flat C-order indices as
        in :func:`softmax_cross_entropy_with_integer_labels`).
      label_weights: floating weights of the same shape (differentiable: the loss is linear
        in them). An entry of weight 0 takes no part whatever its index: pad with index -1
        and weight 0.
      axis: the class axis or axes.
{options}
    Returns:
      The loss in float32 (or wider): per example (the batch shape) or a scalar; with
      ``return_aux`` the pair ``(loss, aux)`` (aux as :func:`softmax_cross_entropy`'s).

    Note:
      The forward pass gathers the k entries' logits (O(N k)) and shifts the normaliser by
      the largest of them: no one-hot or dense label array is built. The backward pass is
      the closed form :math:`g (p \sum_j a_j - y)` from a custom VJP (one pass over the
      logits, as for integer labels), recomputed at the entries' classes and written there
      by a scatter; the gradient of ``label_weights`` is
      :math:`-g \log p_{i_j}` (with ``label_smoothing`` and ``class_weights``:
      :math:`-g (1 - \varepsilon) w_{i_j} \log p_{i_j}`), and ``label_indices`` have none.
      Duplicate indices add up. An entry of non-zero weight whose index is outside
      ``[0, K)`` gives a NaN loss and a NaN gradient row (never a silent wrap to another
      class; :func:`jaxce.checked` raises instead); an entry on a masked class takes no
      part (as a masked soft label); an entry of positive weight on a :math:`-\infty`
      logit (an impossible class) gives :math:`+\infty`, as the dense loss does.
      There is no ``ignore_index``: weight 0 is the padding. An example whose weights are all
      0 has loss 0 (plus its z-loss) and still counts in ``"mean"`` (as a zero soft label);
      give it ``sample_weights`` 0 or mask it with ``where`` (of the batch shape) to leave it
      out. With one entry of weight 1 per example this is
      :func:`softmax_cross_entropy_with_integer_labels`, but for ``"mean"`` with
      ``class_weights``, which divides by the examples' count here (soft labels' semantics),
      not by their :math:`\sum_n w_{y_n}`.
      Forward mode (``jax.jvp``, ``jax.jacfwd``) is not defined for a custom VJP and raises
      JAX's error; use reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
      >>> indices = jnp.array([[0, 1], [0, -1]])  # -1: padding, of weight 0
      >>> weights = jnp.array([[0.5, 0.5], [1.0, 0.0]])
      >>> print(jaxce.softmax_cross_entropy_with_sparse_labels(logits, indices, weights).round(5))
      [0.90761 0.40761]
    """
    opts = make_options(
        integer_labels=False,
        sparse_labels=True,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        base=base,
        reduction=reduction,
        return_aux=return_aux,
        class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name,
        segmented=True,
        num_segments=num_segments,
    )
    examples, class_where = example_mask(logits, axis, where, opts)
    z, mask, axes, batch_shape = logits_in_rows(logits, axis, class_where, opts)
    what = f"logits shape without axis {axis}"
    labels = sparse_labels(label_indices, label_weights, batch_shape, what, z.dtype)
    mesh_axes = {"class_axis_name": class_axis_name, "batch_axis_name": batch_axis_name}
    check_finite("logits", logits, axes, where=where, **mesh_axes)
    taking_part = lambda: counted_rows(mask, left_out_rows(None, examples), batch_shape, opts.spec)
    check_sparse_labels(
        label_indices, label_weights, z.shape[-1], taking_part=taking_part, **mesh_axes
    )
    segments = check_segments(segment_ids, batch_shape, opts)
    return _in_place_loss(
        z, labels, mask, None, batch_shape, class_weights, sample_weights, opts, segments,
        examples,
    )


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
    base: float | None = None,
) -> jax.Array:
    r"""Negative log-likelihood on log-probabilities: :math:`-w_y \log p_y`.

    The notes' "log-likelihood" objective (PyTorch's ``nll_loss``):
    ``nll_loss(log_softmax(z), y)`` equals
    :func:`softmax_cross_entropy_with_integer_labels` for every option they share.

    Args:
      log_probs: floating log-probabilities; ``axis`` holds the K classes.
      labels: integer class ids of the batch shape.
      axis: the class axis or axes.
      where: boolean mask broadcastable to ``log_probs``, as in
        :func:`softmax_cross_entropy_with_integer_labels`.
      ignore_index: as in :func:`softmax_cross_entropy_with_integer_labels`.
      class_weights: as in :func:`softmax_cross_entropy_with_integer_labels`.
      sample_weights: as in :func:`softmax_cross_entropy_with_integer_labels`.
      reduction: as in :func:`softmax_cross_entropy_with_integer_labels`.
      base: as in :func:`softmax_cross_entropy_with_integer_labels`.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> log_p = jnp.log(jnp.array([[0.0508, 0.9492], [0.8360, 0.1640]]))
      >>> print(jaxce.nll_loss(log_p, jnp.array([0, 0]), base=2))
      [4.2990 0.2584]
    """
    opts = make_options(
        integer_labels=True,
        label_smoothing=0.0,
        z_loss=0.0,
        logit_softcap=None,
        base=base,
        reduction=reduction,
        return_aux=False,
        ignore_index=ignore_index,
    )
    lp, mask, _, batch_shape = logits_in_rows(log_probs, axis, where, opts, name="log_probs")
    what = f"log_probs shape without axis {axis}"
    ids, ignored = integer_labels(labels, batch_shape, what, opts.ignore_index)
    check_distribution("log_probs", log_probs, axis, where=where, log=True)
    taking_part = lambda: counted_rows(mask, None, batch_shape, opts.spec)
    check_labels(labels, lp.shape[-1], ignore_index=opts.ignore_index, taking_part=taking_part)
    class_weights, sample_weights = check_weights(
        class_weights, sample_weights, lp.shape[-1], batch_shape, lp.dtype
    )
    lp = masked_fill(lp.astype(compute_dtype(lp.dtype)), mask)
    num_classes = lp.shape[-1]
    picked = jnp.take_along_axis(lp, jnp.clip(ids, 0, num_classes - 1)[..., None], axis=-1)
    counted = counted_rows(mask, ignored, batch_shape, opts.spec)
    found = (ids >= 0) & (ids < num_classes)
    # (An uncounted row's -inf must not meet the class weights' zero cotangent: NaN.)
    picked = jnp.where(counted, picked[..., 0], 0.0)
    # A counted label outside [0, K): NaN loss and a NaN gradient on its row's classes, from
    # a term that is exactly 0 (with a zero gradient) on every other row.
    undefined = jnp.where(found | ~counted, 0.0, jnp.nan)
    loss = undefined * jnp.sum(finite_or_zero(lp), axis=-1) - picked
    if class_weights is not None:
        loss = loss * label_class_weights(class_weights, ids, opts.spec)
    return finish(loss, None, None, ids, counted, class_weights, sample_weights, opts)


def softmax_cross_entropy_hvp(
    logits: ArrayLike,
    v: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Hessian-vector product of softmax cross-entropy in the logits, in O(K) memory.

    .. math:: H v = (\operatorname{diag}(p) - p p^\top) v = p \odot v - p \langle p, v \rangle

    (for labels summing to 1; the Hessian does not depend on them). It is also the Fisher /
    Gauss-Newton product for the logits. No K x K matrix is formed.

    Args:
      logits: floating logits.
      v: the vector(s), same shape as ``logits``.
      axis: the class axis or axes.
      where: boolean mask broadcastable to ``logits``; masked classes give 0.

    Returns:
      :math:`H v` of ``logits``' shape, in float32 (or wider).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.softmax_cross_entropy_hvp(jnp.zeros(2), jnp.array([1.0, 0.0])))
      [ 0.25 -0.25]
    """
    _, z, mask, axes = prepare(logits, axis, where, name="logits")
    v = jnp.asarray(v)
    check_floating("v", v)
    check_shape("v", v, z.shape, "logits shape")
    check_finite("logits", z, axes, where=where)
    p = probabilities(z, mask, axes)
    # A class of p = 0 (masked, or a -inf logit) has a zero row and column of H: its entry of
    # v takes no part, whatever it holds (NaN, inf would give 0 * NaN).
    pv = p * jnp.where(p > 0, v.astype(z.dtype), 0.0)
    return pv - p * jnp.sum(pv, axis=axes, keepdims=True)
