"""The value checks the public functions call, in checked mode (:func:`jaxce.checked`).

Each hook returns at once, in Python, outside checked mode, and puts nothing in the jaxpr;
inside, it emits a :func:`jax.experimental.checkify.check` whose message names the first
offending element (in C order) by its index and value (see :mod:`jaxce._checked`).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify

from ._checked import active_settings
from ._validation import broadcast_mask, canonical_axes

__all__ = [
    "check_distribution",
    "check_finite",
    "check_labels",
    "check_sparse_labels",
    "check_unit_interval",
    "default_tolerance",
]

def _escape(name: str) -> str:
    return name.replace("{", "{{").replace("}", "}}")


def _index_template(name: str, ndim: int, prefix: str, skip: tuple[int, ...] = ()) -> str:
    """``name[{prefix0}, :, {prefix1}]``: format fields for the kept dims, ``:`` for ``skip``."""
    if ndim == 0:
        return _escape(name)
    parts, k = [], 0
    for d in range(ndim):
        if d in skip:
            parts.append(":")
        else:
            parts.append(f"{{{prefix}{k}}}")
            k += 1
    return f"{_escape(name)}[{', '.join(parts)}]"


def _shards(
    ndim: int, axes: tuple[int, ...], class_axis_name: Any = None, batch_axis_name: Any = None
) -> dict[int, Any]:
    """The dims split over mesh axes inside ``shard_map``, as :func:`_report` takes them.

    The leading class axis (of ``axes``) is split over ``class_axis_name``, the leading other
    dim (the batch's) over ``batch_axis_name``; ``None`` splits nothing.
    """
    split = {}
    rest = [d for d in range(ndim) if d not in axes]
    if class_axis_name is not None and axes:
        split[min(axes)] = class_axis_name
    if batch_axis_name is not None and rest:
        split[rest[0]] = batch_axis_name
    return split


def _global_index(index: tuple, shape: tuple[int, ...], split: Mapping[int, Any]) -> tuple:
    """A shard's index in the global array: dim ``d``, split over mesh axis ``split[d]`` in
    contiguous slices in device order, is offset by the shard's position times its size."""
    return tuple(
        i + lax.axis_index(split[d]) * shape[d] if d in split else i for d, i in enumerate(index)
    )


def _report(
    bad: jax.Array,
    at: str,
    message: str,
    x: jax.Array | None = None,
    split: Mapping[int, Any] | None = None,
    **fields,
) -> None:
    """Emit one check: fails if any of ``bad``; names the first True (C order) of it.

    ``at`` is an index template (:func:`_index_template` with prefix ``i``) of ``bad``'s
    dims; ``{value}`` in ``message`` is the element of ``x`` (same shape as ``bad``) there.
    ``split`` maps the dims of ``bad`` that are a shard of a global array (inside
    ``shard_map``) to their mesh axes (see :func:`_shards`): the index named is the global one.
    """
    pos = jnp.argmax(bad.reshape(-1))
    index = jnp.unravel_index(pos, bad.shape) if bad.ndim else ()
    index = _global_index(index, bad.shape, split or {})
    fields.update({f"i{k}": i for k, i in enumerate(index)})
    if x is not None:
        fields["value"] = x.reshape(-1)[pos]
    checkify.check(~jnp.any(bad), "jaxce.checked: " + at + message, **fields)


def _labels_out_of_range(labels: jax.Array, k: int, ignore_index: int | None) -> jax.Array:
    """``labels`` outside ``[0, k)`` that are not ``ignore_index``, exact in every integer dtype.

    A bound the labels' dtype cannot hold is settled here, in Python, never converted into
    that dtype, where it would wrap (256 is 0 in uint8, -100 is 156): no uint8 label is
    ``>= 256``, and an ``ignore_index`` outside the dtype's range matches no label.
    """
    info = jnp.iinfo(labels.dtype)
    bad = jnp.zeros(labels.shape, bool)
    if info.min < 0:
        bad = bad | (labels < 0)
    if k <= info.max:
        bad = bad | (labels >= jnp.asarray(k, labels.dtype))
    if ignore_index is not None and info.min <= ignore_index <= info.max:
        bad = bad & (labels != jnp.asarray(ignore_index, labels.dtype))
    return bad


def check_labels(
    labels: jax.Array,
    num_classes: int,
    *,
    ignore_index: int | None = None,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
    name: str = "labels",
    taking_part: Callable[[], jax.Array] | None = None,
) -> None:
    """In checked mode: every integer label is in ``[0, num_classes)`` or is ``ignore_index``.

    ``taking_part`` (None: every example) gives, when called (only in checked mode), the
    examples whose labels are checked, of the labels' shape: an example whose classes are all
    masked, or that an example mask leaves out, takes no part in the loss, whatever its label.

    ``num_classes`` is the number of classes the labels index. With ``class_axis_name`` (the
    class axis split over a mesh axis inside ``shard_map``) pass the local count: it is
    multiplied by the axis size here, so the range checked is the global ``[0, K)``. With
    ``batch_axis_name`` (the labels' leading axis split over that mesh axis, in contiguous
    slices in device order) the index named is the global one. The comparisons are exact in
    every integer dtype (uint8 labels with ``K = 256``, ``ignore_index=-100`` with uint8).

    Message: ``labels[3] = 7 is outside [0, 5) (ignore_index=None)``.
    """
    if active_settings() is None:
        return
    labels = jnp.asarray(labels)
    k = num_classes
    if class_axis_name is not None:
        k = num_classes * jax.lax.axis_size(class_axis_name)
    bad = _labels_out_of_range(labels, k, ignore_index)
    if taking_part is not None:
        bad = bad & taking_part()
    at = _index_template(name, labels.ndim, "i")
    message = f" = {{value}} is outside [0, {k}) (ignore_index={ignore_index!r})"
    _report(bad, at, message, labels, _shards(labels.ndim, (), None, batch_axis_name))


def check_sparse_labels(
    indices: jax.Array,
    weights: jax.Array,
    num_classes: int,
    *,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
    names: tuple[str, str] = ("label_indices", "label_weights"),
    taking_part: Callable[[], jax.Array] | None = None,
) -> None:
    """In checked mode: every entry of non-zero weight has an index in ``[0, num_classes)``,
    and every weight is finite (an entry of weight 0 is padding: any index).

    ``indices`` and ``weights`` are ``[..., k]``; ``num_classes``, ``class_axis_name``,
    ``batch_axis_name`` and ``taking_part`` (of the batch shape) as in :func:`check_labels`.

    Messages: ``label_indices[3, 1] = 7 is outside [0, 5) with a non-zero weight (an entry of
    weight 0 may hold any index)``, ``label_weights[0, 2] is nan (NaN and +-inf are not
    allowed)``.
    """
    if active_settings() is None:
        return
    indices, weights = jnp.asarray(indices), jnp.asarray(weights)
    k = num_classes
    if class_axis_name is not None:
        k = num_classes * jax.lax.axis_size(class_axis_name)
    bad = _labels_out_of_range(indices, k, None) & (weights != 0)
    rows = None if taking_part is None else taking_part()[..., None]
    if rows is not None:
        bad = bad & rows
    at = _index_template(names[0], indices.ndim, "i")
    message = (
        f" = {{value}} is outside [0, {k}) with a non-zero weight (an entry of weight 0 may "
        "hold any index)"
    )
    _report(bad, at, message, indices, _shards(indices.ndim, (), None, batch_axis_name))
    check_finite(
        names[1], weights, -1, where=rows, allow_neg_inf=False, batch_axis_name=batch_axis_name
    )


def check_finite(
    name: str,
    x: jax.Array,
    axis: int | Sequence[int] = -1,
    *,
    where: jax.Array | None = None,
    allow_neg_inf: bool = True,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
) -> None:
    r"""In checked mode: no element of ``x`` is NaN or :math:`+\infty` (nor :math:`-\infty`
    unless ``allow_neg_inf``: a :math:`-\infty` logit is an impossible class, which is valid).

    ``where`` is the function's mask (raw or broadcast; ``axis`` says how a mask of the batch
    shape broadcasts): masked elements are not checked. Inside ``shard_map``, with
    ``class_axis_name`` (the leading axis of ``axis`` split over that mesh axis) and
    ``batch_axis_name`` (the leading other dim split over it), the index named is the global
    one.

    Message: ``logits[0, 2] is nan (NaN and +inf are not allowed)``.
    """
    if active_settings() is None:
        return
    x = jnp.asarray(x)
    axes = canonical_axes(axis, x.ndim)
    bad = jnp.isnan(x) | (x == jnp.inf)
    if not allow_neg_inf:
        bad = bad | (x == -jnp.inf)
    if where is not None:
        bad = bad & broadcast_mask(where, x.shape, axes)
    allowed = "NaN and +inf are" if allow_neg_inf else "NaN and +-inf are"
    at = _index_template(name, x.ndim, "i")
    split = _shards(x.ndim, axes, class_axis_name, batch_axis_name)
    _report(bad, at, f" is {{value}} ({allowed} not allowed)", x, split)


def check_unit_interval(name: str, x: jax.Array, *, where: jax.Array | None = None) -> None:
    """In checked mode: every element of ``x`` is a probability in ``[0, 1]`` (not NaN).

    For elementwise probabilities (binary labels, :func:`jaxce.information`); ``where`` is a
    boolean mask broadcastable to ``x``. Message: ``labels[2] = 1.5 is outside [0, 1]``.
    """
    if active_settings() is None:
        return
    x = jnp.asarray(x)
    bad = ~((x >= 0) & (x <= 1))
    if where is not None:
        bad = bad & broadcast_mask(where, x.shape, ())
    _report(bad, _index_template(name, x.ndim, "i"), " = {value:.6g} is outside [0, 1]", x)


def default_tolerance(dtype) -> float:
    """``max(1e-3, 4 eps)``: 1e-3 for float32 and float64, 0.031 for bf16, 0.0039 for f16."""
    return max(1e-3, 4.0 * float(jnp.finfo(dtype).eps))


def check_distribution(
    name: str,
    p: jax.Array,
    axis: int | Sequence[int] = -1,
    *,
    where: jax.Array | None = None,
    log: bool = False,
    dtype=None,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
) -> None:
    r"""In checked mode: ``p`` holds distributions along ``axis``.

    Every (unmasked) element is finite and non-negative, and each example's sum is within
    the tolerance of 1 (examples whose classes are all masked are exempt). With ``log=True``
    ``p`` holds log-probabilities: NaN and :math:`+\infty` are errors, :math:`-\infty`
    (probability 0) is allowed, and :math:`\sum_k e^{p_k}` must be within the tolerance of 1.
    The tolerance is :func:`jaxce.checked`'s ``tolerance``, by default :func:`default_tolerance` of
    ``dtype``: the dtype the caller received ``p`` in (``p``'s own dtype if ``None``; pass it
    when ``p`` was already upcast, or bf16 labels would be held to float32's tolerance).
    ``where`` is the function's mask (raw or broadcast). Inside ``shard_map``, with
    ``class_axis_name`` (the leading axis of ``axis`` split over that mesh axis) the sums are
    taken over the whole distribution, and with it and ``batch_axis_name`` (the leading other
    dim split over that mesh axis) the index named is the global one.

    Messages: ``labels[1, 2] = -0.1 is negative``, ``labels[1, :] sums to 0.8, not 1
    (tolerance 0.001)``, ``log_probs[0, :] exp-sums to 2, not 1 (tolerance 0.001)``.
    """
    settings = active_settings()
    if settings is None:
        return
    p = jnp.asarray(p)
    axes = canonical_axes(axis, p.ndim)
    mask = broadcast_mask(where, p.shape, axes)
    keep = jnp.ones(p.shape, bool) if mask is None else mask
    tol = settings.tolerance
    if tol is None:
        tol = default_tolerance(p.dtype if dtype is None else dtype)
    at = _index_template(name, p.ndim, "i")
    split = _shards(p.ndim, axes, class_axis_name, batch_axis_name)
    bad = keep & (jnp.isnan(p) | (p == jnp.inf))
    if not log:
        bad = bad | (keep & (p == -jnp.inf))
    _report(bad, at, f" is {{value}} (not a {'log-' if log else ''}probability)", p, split)
    x = p.astype(jnp.promote_types(p.dtype, jnp.float32))
    if log:
        total = jnp.sum(jnp.where(keep, jnp.exp(jnp.where(keep, x, -jnp.inf)), 0.0), axis=axes)
        verb = "exp-sums"
    else:
        _report(keep & (p < 0), at, " = {value:.6g} is negative", p, split)
        total = jnp.sum(jnp.where(keep, x, 0.0), axis=axes)
        verb = "sums"
    held = jnp.sum(keep, axis=axes, dtype=jnp.int32)
    if class_axis_name is not None:
        total, held = lax.psum((total, held), class_axis_name)
    bad_rows = (held > 0) & ~(jnp.abs(total - 1.0) <= tol)  # a NaN sum fails
    row = _index_template(name, p.ndim, "i", skip=axes)
    message = f" {verb} to {{value:.6g}}, not 1 (tolerance {tol:g})"
    _report(bad_rows, row, message, total, _shards(bad_rows.ndim, (), None, batch_axis_name))
