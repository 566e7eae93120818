"""The options shared by every softmax cross-entropy path: validation, labels and masks,
sample weights, reductions and the aux outputs, outside the custom VJP."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._normalizer import label_lookup
from ._row_stats import z_loss_term
from ._softmax import move_axes_last
from ._spec import SparseLabels, Spec, class_sum, varying_axes
from ._validation import (
    broadcast_mask,
    canonical_axes,
    check_floating,
    check_integer,
    check_nonnegative_option,
    check_reduction,
    check_shape,
    check_softcap,
    compute_dtype,
    log_base,
    static_bool,
    static_int,
)

# ----------------------------------------------------------------------------------------------
# Weighting and reduction, outside the custom VJP: autodiff covers sample weights and the
# denominator, and the custom VJP sees the per-example cotangent.


_INT32 = jnp.iinfo(jnp.int32)


def _mean(num, den):
    """``num / den``; 0 / 0 is 0 (nothing counted), while x / 0 for x != 0 is NaN (undefined).

    x / 0 arises when the counted examples' weights sum to 0 but their losses do not (class
    weights 0 on every label, with label smoothing putting mass on other classes); its
    gradient is NaN too (``num * nan``), so value and gradient agree.
    """
    # num times a factor that depends on num only through a compare: its gradient is the
    # factor, NaN only where the mean is (a NaN in a select's untaken branch would leak).
    factor = jnp.where(den != 0, 1.0 / jnp.where(den != 0, den, 1.0), jnp.where(num == 0, 0.0, jnp.nan))
    return num * factor


def reduce_losses(
    loss, counted, norm, reduction: str, scale: float, batch_axis_name=None, segments=None
) -> jax.Array:
    """Reduce per-example losses that are already 0 on the uncounted examples.

    ``norm`` is each counted example's share of the mean's denominator; ``scale`` is ln(base).
    ``batch_axis_name`` makes the sums global across a sharded batch. ``segments`` is the pair
    ``(segment_ids, num_segments)`` of ``"segment_mean"``.
    """
    if reduction == "none":
        return loss / scale
    if reduction == "segment_mean":
        return _segment_mean(loss, counted, norm, segments, batch_axis_name) / scale
    total = jnp.sum(loss)
    if batch_axis_name is not None:
        total = lax.psum(total, batch_axis_name)
    if reduction == "sum":
        return total / scale
    den = jnp.sum(jnp.where(counted, norm, 0.0))
    if batch_axis_name is not None:
        den = lax.psum(den, batch_axis_name)
    return _mean(total, den) / scale


def _segment_mean(loss, counted, norm, segments, batch_axis_name):
    """The mean of each segment's counted losses (weighted by ``norm``), then the mean over the
    segments whose counted weight is not 0 (T5X's per-sequence average of packed sequences).

    Segment ids are global (across a sharded batch too). A counted example whose id is outside
    ``[0, num_segments)`` makes the result NaN: it is never dropped or wrapped silently.
    """
    segment_ids, num_segments = segments
    ids = segment_ids.reshape(-1)
    inside = (ids >= 0) & (ids < num_segments)
    # An example outside every segment adds nothing (its loss is zeroed, with its gradient).
    sums = jax.ops.segment_sum(jnp.where(inside, loss.reshape(-1), 0.0), ids, num_segments)
    weights = jnp.where(counted & inside.reshape(counted.shape), norm, 0.0).reshape(-1)
    dens = jax.ops.segment_sum(weights, ids, num_segments)
    stray = jnp.sum(counted.reshape(-1) & ~inside, dtype=jnp.int32)
    if batch_axis_name is not None:
        sums, dens, stray = (lax.psum(a, batch_axis_name) for a in (sums, dens, stray))
    means = _mean(sums, dens)
    held = jnp.sum(dens != 0, dtype=sums.dtype)
    return _mean(jnp.sum(means), held) + jnp.where(stray > 0, jnp.nan, 0.0)


def _int32_ids(ids):
    """Integer ids as int32, those beyond int32's range as -1 (outside every class or segment).

    The bounds are compared in the ids' own dtype only where it holds them (int32's minimum
    would wrap to 2**31 in uint32, and every id would fail the test)."""
    info = jnp.iinfo(ids.dtype)
    if info.max > _INT32.max or info.min < _INT32.min:
        ids = jnp.where((ids >= max(info.min, _INT32.min)) & (ids <= _INT32.max), ids, -1)
    return ids.astype(jnp.int32)


def check_segments(segment_ids, batch_shape, opts: "Options"):
    """``(segment_ids, num_segments)`` as int32 ids of the batch shape for ``"segment_mean"``;
    None for the other reductions (which ignore ``segment_ids``)."""
    if opts.reduction != "segment_mean":
        return None
    if segment_ids is None:
        raise ValueError('reduction="segment_mean" needs segment_ids (integers of the batch shape)')
    segment_ids = jnp.asarray(segment_ids)
    check_integer("segment_ids", segment_ids)
    check_shape("segment_ids", segment_ids, batch_shape, "the batch shape")
    return _int32_ids(segment_ids), opts.num_segments


def label_class_weights(class_weights, labels, spec: Spec):
    """:math:`w_{y_n}` by an O(N) gather from the local slice (0 for labels outside [0, K))."""
    return label_lookup(class_weights, labels, spec)[0]


class Options(NamedTuple):
    """Validated options shared by every softmax cross-entropy entry point."""

    spec: Spec
    scale: float
    reduction: str
    return_aux: bool
    ignore_index: int | None
    batch_axis_name: Any
    num_segments: int | None = None  # with reduction="segment_mean"


def make_options(
    *,
    integer_labels: bool,
    label_smoothing,
    z_loss,
    logit_softcap,
    base,
    reduction,
    return_aux,
    ignore_index=None,
    class_axis_name=None,
    batch_axis_name=None,
    segmented=False,
    num_segments=None,
    sparse_labels: bool = False,
) -> Options:
    """Validated options; ``segmented`` entry points also take ``reduction="segment_mean"``,
    which needs ``num_segments``, a static int >= 1."""
    check_reduction(reduction, segmented)
    if reduction == "segment_mean":
        num_segments = static_int("num_segments", num_segments, optional=True)
        if num_segments is None or num_segments < 1:
            raise ValueError(
                f'reduction="segment_mean" needs num_segments, an int >= 1, got {num_segments!r}'
            )
    else:
        num_segments = None
    ignore_index = static_int("ignore_index", ignore_index, optional=True)
    spec = Spec(
        integer_labels=integer_labels,
        label_smoothing=check_nonnegative_option("label_smoothing", label_smoothing, upper=1.0),
        z_loss=check_nonnegative_option("z_loss", z_loss),
        logit_softcap=check_softcap(logit_softcap),
        class_axis_name=class_axis_name,
        sparse_labels=sparse_labels,
    )
    return_aux = static_bool("return_aux", return_aux)
    return Options(
        spec, log_base(base), reduction, return_aux, ignore_index, batch_axis_name, num_segments
    )


def check_varying(opts: Options, class_operand, batch_operand) -> None:
    """Raise unless the operands vary over the mesh axes named for the classes and the batch.

    Inside ``shard_map`` with ``check_vma=False`` JAX tracks no varying axes, and the
    gradients (summed over the shards of an operand replicated on an axis, see ``sum_like``)
    would be silently wrong; an operand replicated on the axis said to split it is a mistake
    too. Outside ``shard_map`` no axis is named and nothing is checked.
    """
    named = (("class_axis_name", opts.spec.class_axis_name, class_operand),
             ("batch_axis_name", opts.batch_axis_name, batch_operand))
    for option, axis, (operand_name, operand) in named:
        if isinstance(axis, (tuple, list)):
            raise ValueError(
                f"{option}={axis!r}: name one mesh axis (a string), not a sequence of them; "
                "splitting the classes or the batch over several mesh axes is not supported"
            )
        if axis is not None and axis not in varying_axes(operand):
            raise ValueError(
                f"{option}={axis!r}, but {operand_name} does not vary over mesh axis {axis!r} "
                f"(it varies over {sorted(varying_axes(operand))}): call jaxce inside "
                "jax.shard_map with check_vma=True (the default), with the operand sharded "
                f"over {axis!r}"
            )


def check_weights(class_weights, sample_weights, num_classes, batch_shape, dtype=None):
    """Validate and upcast the optional weights; class weights come back with shape (K,), in
    the compute dtype of ``dtype`` (the logits' dtype): the loss's arithmetic is in one dtype
    (float64 weights on float32 logits would mix them), and autodiff of the cast gives the
    weights' gradient in their own dtype."""
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights)
        check_floating("class_weights", class_weights)
        if class_weights.size != num_classes or class_weights.ndim == 0:
            raise ValueError(
                f"class_weights shape {class_weights.shape} does not match the {num_classes} classes"
            )
        dtype = compute_dtype(dtype or class_weights.dtype)
        class_weights = class_weights.reshape(-1).astype(dtype)
    if sample_weights is not None:
        sample_weights = jnp.asarray(sample_weights)
        check_floating("sample_weights", sample_weights)
        check_shape("sample_weights", sample_weights, batch_shape, "the batch shape")
        sample_weights = sample_weights.astype(compute_dtype(sample_weights.dtype))
    return class_weights, sample_weights


def finish(
    stats_loss, lse, correct, labels, counted, class_weights, sample_weights, opts: Options,
    segments=None,
):
    """Apply sample weights, reduction and base; build the aux dict. Shared by every path.

    ``segments``: :func:`check_segments`' pair for ``"segment_mean"``."""
    spec = opts.spec
    # Uncounted rows take no part: their loss (NaN for an ignored label that matches no class)
    # and their sample weight (even NaN) are zeroed before they meet, so neither reaches the
    # other's gradient (the double where).
    loss = jnp.where(counted, stats_loss, 0.0)
    norm = jnp.ones_like(loss)
    if spec.integer_labels and class_weights is not None:
        norm = label_class_weights(class_weights, labels, spec)
    if sample_weights is not None:
        weights = jnp.where(counted, sample_weights, 0.0)
        loss, norm = loss * weights, norm * weights
    out = reduce_losses(
        loss, counted, norm, opts.reduction, opts.scale, opts.batch_axis_name, segments
    )
    if not opts.return_aux:
        return out
    aux = {"logsumexp": lse, "z_loss": z_loss_term(lse, spec) / opts.scale}
    if spec.integer_labels:
        aux["correct"] = (correct > 0.5) & counted
    return out, aux


def left_out_rows(ignored, examples):
    """The rows whose loss is not kept: the ``ignored`` labels' (None: none) and those an
    example mask (:func:`example_mask`; None: none) leaves out. None if there are none."""
    if examples is None:
        return ignored
    return ~examples if ignored is None else ignored | ~examples


def counted_rows(mask, ignored, batch_shape, spec: Spec):
    """Examples that count: not ignored, and with at least one unmasked class (all shards)."""
    counted = jnp.ones(batch_shape, bool) if ignored is None else ~ignored
    if mask is not None:
        held = jnp.sum(mask, axis=-1, dtype=jnp.int32)
        counted = counted & (class_sum(held, spec) > 0)
    return jnp.broadcast_to(counted, batch_shape)


def integer_labels(labels, batch_shape, what: str, ignore_index: int | None, name="labels"):
    """Validate integer labels; return ``(ids, ignored)``: int32 class ids and the ignore mask.

    Every comparison is exact whatever the labels' dtype: K, the class offsets and
    ``ignore_index`` are never converted into a narrow dtype, where they would wrap (K = 256
    is 0 in uint8, -100 is 156). Labels that do not fit in int32 become -1, outside every
    [0, K): NaN, never another class. ``ignored`` (None without ``ignore_index``) compares
    the original labels, and is all False when ``ignore_index`` is not a value of their dtype;
    ignored examples get the id 0 (they take no part, and an id outside [0, K) would give its
    row a NaN gradient).
    With 64-bit types disabled JAX truncates int64 labels to int32 (2**32 + 1 would become
    class 1); NumPy input is checked here for that, and raises.
    """
    if isinstance(labels, (np.ndarray, np.generic)) and labels.dtype.kind in "iu":
        out_of_int32 = (labels < _INT32.min) | (labels > _INT32.max)
        if not jax.config.jax_enable_x64 and labels.dtype.itemsize == 8 and np.any(out_of_int32):
            raise ValueError(
                f"{name} hold {labels[out_of_int32].flat[0]}, beyond int32, which JAX truncates "
                "to another class while 64-bit types are disabled (enable jax_enable_x64)"
            )
    labels = jnp.asarray(labels)
    check_integer(name, labels)
    check_shape(name, labels, batch_shape, what)
    ids = _int32_ids(labels)
    info = jnp.iinfo(labels.dtype)
    ignored = None
    if ignore_index is not None:
        if info.min <= ignore_index <= info.max:
            # (as an array of the labels' dtype: as a Python int, 2**64 - 1 for uint64 labels
            # would not parse)
            ignored = labels == jnp.asarray(ignore_index, labels.dtype)
        else:
            ignored = jnp.zeros(labels.shape, bool)
        ids = jnp.where(ignored, 0, ids)  # any class: their loss and gradient are zeroed
    return ids, ignored


def sparse_labels(
    indices, weights, batch_shape, what: str, dtype, names=("label_indices", "label_weights")
):
    """Validate sparse labels: integer ``indices`` of shape ``batch_shape + (k,)``, floating
    ``weights`` of the same shape; return them as :class:`SparseLabels` (int32 ids as
    :func:`integer_labels` makes them, weights in the compute dtype of ``dtype``, the
    logits', as class weights in :func:`check_weights`)."""
    index_name, weight_name = names
    weights = jnp.asarray(weights)
    shape = jnp.shape(indices)
    check_integer(index_name, jnp.asarray(indices))
    check_floating(weight_name, weights)
    if len(shape) != len(batch_shape) + 1 or tuple(shape[:-1]) != tuple(batch_shape):
        raise ValueError(
            f"{index_name} shape {tuple(shape)} does not match {what} {tuple(batch_shape)} plus "
            "a last axis of k entries"
        )
    check_shape(weight_name, weights, shape, f"{index_name} shape")
    ids, _ = integer_labels(indices, shape, what, None, name=index_name)
    return SparseLabels(ids, weights.astype(compute_dtype(dtype)))


def _check_unambiguous(where, logits_shape, batch_shape, opts: Options) -> None:
    """Inside ``shard_map`` with the classes split, refuse a mask of the batch shape that is
    also a mask of the trailing (class) shape: on one device the global shapes tell which it
    is, but the local shard's shapes may coincide (4 rows x 4 classes of 16)."""
    if where is None or opts.spec.class_axis_name is None:
        return
    shape = jnp.shape(where)
    if len(shape) < len(logits_shape) and shape == batch_shape == logits_shape[-len(shape):]:
        raise ValueError(
            f"where shape {shape} is both the local batch shape and the local class shape of "
            f"logits {logits_shape} inside shard_map: give it the logits' rank, with size-1 "
            f"axes where it does not vary (e.g. {(1,) * (len(logits_shape) - len(shape)) + shape} "
            f"for a class mask, {shape + (1,) * (len(logits_shape) - len(shape))} for an "
            "example mask with the classes last)"
        )


def example_mask(logits, axis, where, opts: Options):
    """``(examples, where)``: a ``where`` constant over the class axes as a mask of the batch
    shape (``where`` then None), or ``(None, where)``.

    Such a mask leaves out whole examples; as a mask of the batch shape it costs O(N), where
    broadcast over the classes it is an [N, K] operand that turns every row sum into its
    select form. Invalid masks are left to :func:`logits_in_rows` to refuse.
    """
    if where is None:
        return None, None
    where = jnp.asarray(where)
    shape = jnp.shape(logits)
    if where.dtype != jnp.bool_ or where.ndim > len(shape):
        return None, where
    axes = canonical_axes(axis, len(shape))
    batch_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
    _check_unambiguous(where, shape, batch_shape, opts)
    if where.ndim != len(shape) and where.shape == batch_shape:
        return where, None
    padded = where.reshape((1,) * (len(shape) - where.ndim) + where.shape)
    if any(padded.shape[a] != 1 for a in axes):
        return None, where
    rows = jnp.squeeze(padded, axes)
    if not all(r in (1, b) for r, b in zip(rows.shape, batch_shape)):
        return None, where
    return jnp.broadcast_to(rows, batch_shape), None


def logits_in_rows(logits, axis, where, opts: Options, name="logits"):
    logits = jnp.asarray(logits)
    check_floating(name, logits)
    axes = canonical_axes(axis, logits.ndim)
    if opts.spec.class_axis_name is not None and list(axes) != sorted(axes):
        # A shard holds a contiguous slice of the flat class index only when the split (the
        # leading) class axis is also the major one of the flattening.
        raise ValueError(
            f"axis {axis} must list the class axes in increasing order with class_axis_name "
            f"(got {axes} for logits of rank {logits.ndim})"
        )
    batch_shape = tuple(d for i, d in enumerate(logits.shape) if i not in axes)
    _check_unambiguous(where, logits.shape, batch_shape, opts)
    mask = broadcast_mask(where, logits.shape, axes)
    if not all(logits.shape[a] for a in axes):
        class_shape = tuple(logits.shape[a] for a in axes)
        raise ValueError(f"{name} have no classes: axis {axis} of shape {logits.shape} is {class_shape}")
    flat = move_axes_last(logits, axes)
    return flat, (None if mask is None else move_axes_last(mask, axes)), axes, batch_shape


def with_option_doc(fn):
    """Put the options shared by both softmax cross-entropies into ``fn``'s docstring at
    ``{options}`` (see :func:`expand_option_doc`)."""
    fn.__doc__ = expand_option_doc(fn.__doc__)
    return fn


def expand_option_doc(doc: str) -> str:
    """``doc`` with its ``{options}`` line replaced by ``OPTION_DOC`` and a blank line: a
    docstring must be a literal, so the shared text cannot be concatenated into it (the docs
    site expands the source's docstrings with this too, ``docs/rest_markup.py``)."""
    return doc.replace("{options}\n", OPTION_DOC.lstrip("\n") + "\n")


OPTION_DOC = r"""
      where: boolean mask broadcastable to ``logits`` (a mask of the batch shape masks whole
        examples, as in optax). Masked classes take no part; a fully masked example has loss 0,
        gradient 0, and does not count in ``"mean"``. A mask constant over the classes (of the
        batch shape, or with size-1 class axes) leaves its examples out as ``ignore_index``
        does, at no [..., K] cost; whatever their logits and labels hold (NaN, inf), their
        gradients are 0, as are an ignored example's. Inside ``shard_map`` with the classes
        split, a mask whose shape is both the local batch shape and the local class shape is
        refused as ambiguous: give it the logits' rank.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; targets become
        :math:`(1 - \varepsilon) y + \varepsilon / K` over the unmasked classes.
      class_weights: shape ``[K]``; weight :math:`w_k` multiplies class k's term.
      sample_weights: the batch shape; multiplies each example's loss.
      z_loss: :math:`\lambda_z \ge 0`; adds :math:`\lambda_z \operatorname{lse}(z)^2` per example
        (PaLM's auxiliary loss).
      logit_softcap: :math:`c \in (0, 2^{100}]`; logits pass through :math:`c \tanh(z / c)`
        first (Gemma 2); a :math:`-\infty` logit stays an impossible class.
      base: logarithm base of the loss (``None`` nats, ``2`` bits, ``10`` hartleys); loss and
        gradient are divided by :math:`\ln b`.
      reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"``: the sum divided by the
        counted examples' total weight (their sample weights, times :math:`w_{y_n}` with class
        weights and integer labels); 0 when nothing counts (0 / 0), NaN when that weight is 0
        but the sum is not (x / 0: class weights 0 on every label, with smoothing);
        ``"segment_mean"``: that mean within each segment (``segment_ids``), then the plain
        mean over the segments whose counted weight is not 0 (T5X's per-sequence average of
        packed sequences; NaN if a counted example's id is outside ``[0, num_segments)``).
      return_aux: also return a dict with per-example ``logsumexp``, the ``z_loss`` term (0 for
        an example without a possible class) and (integer labels) ``correct``: whether the
        label's logit is the largest (False for an impossible or out-of-range label).
      class_axis_name: inside ``shard_map``, the mesh axis over which the class axis is split
        (each device holds a contiguous slice, in device order); the losses combine O(N)
        statistics with ``pmax``/``psum`` and give the single-device numbers. ``shard_map``
        must keep ``check_vma=True``: without it the gradients would be wrong, and the losses
        raise.
      batch_axis_name: the mesh axis over which the batch is split; ``"sum"``, ``"mean"`` and
        ``"segment_mean"`` become global.
      segment_ids: with ``reduction="segment_mean"``, integers of the batch shape in
        ``[0, num_segments)`` naming each example's segment (a sequence of a packed batch;
        global across a sharded batch); ignored by the other reductions.
      num_segments: with ``"segment_mean"``, the number of segment ids (a static int).
"""
