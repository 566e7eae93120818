r"""Checked mode: value checks on the data, opt-in, built on :mod:`jax.experimental.checkify`.

The public functions check shapes, dtypes and options in Python while JAX traces (see
:mod:`jaxce._validation`). Problems that need the data (a label out of range, labels that are
not a distribution, a NaN logit) cannot raise there: the values are tracers. jaxce documents
what such inputs give (NaN, or a loss computed from whatever the labels hold) and checks them
only inside :func:`checked`.

Each public function calls the hooks below (:func:`check_labels`, :func:`check_distribution`,
:func:`check_finite`). Outside :func:`checked` a hook returns at once, in Python, and puts
nothing in the jaxpr: the unchecked functions cost nothing. Inside, it emits a
:func:`jax.experimental.checkify.check` whose message names the first offending element (in
C order) by its index and value.

Whether checks are on is part of JAX's jit cache key (a private ``jax._src.config`` state, like
the ones behind ``jax.default_device`` and meshes), so a function jitted and called before it
was wrapped is traced again, with its checks, inside :func:`checked`, and keeps its cached
unchecked version outside. Should that private API ever disappear, a
:class:`contextvars.ContextVar` takes its place and :func:`checked` unwraps a ``jax.jit``
function it is given (``fn.__wrapped__``); jitted functions called *inside* ``fn`` would then
keep any unchecked trace they already have.
"""

import contextlib
import contextvars
import functools
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from ._validation import broadcast_mask, canonical_axes

__all__ = [
    "CheckError",
    "checked",
    "check_distribution",
    "check_finite",
    "check_labels",
    "check_sparse_labels",
    "check_unit_interval",
]


class CheckError(ValueError):
    """A value check of :func:`jaxce.checked` failed; the message names the element."""


class _Settings(NamedTuple):
    """What a checked trace depends on (hashable: it is part of the jit cache key)."""

    tolerance: float | None  # None: max(1e-3, 4 eps) of the labels' dtype


def _jit_key_state():
    """A trace-context state that enters JAX's jit cache key, or None if this JAX lacks one."""
    try:
        from jax._src.config import config_ext

        return config_ext.Config(
            "jaxce_checked", None, include_in_jit_key=True, include_in_trace_context=True
        )
    except Exception:  # pragma: no cover - depends on JAX's private API
        return None


_STATE = _jit_key_state()
_FALLBACK: contextvars.ContextVar[_Settings | None] = contextvars.ContextVar(
    "jaxce_checked", default=None
)


def _settings() -> _Settings | None:
    return _FALLBACK.get() if _STATE is None else _STATE.value


@contextlib.contextmanager
def _active(settings: _Settings):
    if _STATE is None:
        token = _FALLBACK.set(settings)
        try:
            yield
        finally:
            _FALLBACK.reset(token)
    else:
        previous = _STATE.swap_local(settings)
        try:
            yield
        finally:
            _STATE.set_local(previous)


def is_active() -> bool:
    """Whether the caller is being traced inside :func:`checked`."""
    return _settings() is not None


def _kept_effects():
    """JAX's registry of effects that partial evaluation keeps, and checkify's effect type.

    ``None`` if JAX keeps checks already, or lacks this private API (like
    :func:`_jit_key_state`'s): then there is nothing to register.
    """
    try:
        from jax._src import effects
        from jax._src.checkify import ErrorEffect

        kept = effects.partial_eval_kept_effects
        return None if ErrorEffect in kept._effect_types else (kept, ErrorEffect)
    except Exception:  # pragma: no cover - depends on JAX's private API
        return None


_KEPT = _kept_effects()
_KEEP_LOCK = threading.Lock()
_tracing = 0  # checked traces running now, in any thread


@contextlib.contextmanager
def _checks_survive_partial_eval():
    """While :func:`checked` traces: JAX's partial evaluation keeps check equations.

    Reverse-mode AD of a ``lax.scan`` (and of a ``fori_loop``, a scan once its bounds are
    static) partially evaluates the loop body to hoist its loop-invariant work, and that pass
    drops every equation whose outputs nothing uses unless its effect type is registered in
    ``partial_eval_kept_effects`` (as debug callbacks are). Checkify's ``ErrorEffect`` is not,
    and a check has no outputs: ``checked(jax.grad(lambda z: lax.scan(...)))`` caught nothing.
    The registration lasts while a checked trace runs, so JAX behaves as before elsewhere.
    """
    global _tracing
    if _KEPT is None:  # pragma: no cover - depends on the JAX version
        yield
        return
    kept, effect_type = _KEPT
    with _KEEP_LOCK:
        _tracing += 1
        kept.add_type(effect_type)
    try:
        yield
    finally:
        with _KEEP_LOCK:
            _tracing -= 1
            if not _tracing:
                kept._effect_types.discard(effect_type)


# ----------------------------------------------------------------------------------------------
# Hooks called by the public functions. Each returns at once unless checked mode is on.


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
) -> None:
    """In checked mode: every integer label is in ``[0, num_classes)`` or is ``ignore_index``.

    ``num_classes`` is the number of classes the labels index. With ``class_axis_name`` (the
    class axis split over a mesh axis inside ``shard_map``) pass the local count: it is
    multiplied by the axis size here, so the range checked is the global ``[0, K)``. With
    ``batch_axis_name`` (the labels' leading axis split over that mesh axis, in contiguous
    slices in device order) the index named is the global one. The comparisons are exact in
    every integer dtype (uint8 labels with ``K = 256``, ``ignore_index=-100`` with uint8).

    Message: ``labels[3] = 7 is outside [0, 5) (ignore_index=None)``.
    """
    if _settings() is None:
        return
    labels = jnp.asarray(labels)
    k = num_classes
    if class_axis_name is not None:
        k = num_classes * jax.lax.axis_size(class_axis_name)
    bad = _labels_out_of_range(labels, k, ignore_index)
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
) -> None:
    """In checked mode: every entry of non-zero weight has an index in ``[0, num_classes)``,
    and every weight is finite (an entry of weight 0 is padding: any index).

    ``indices`` and ``weights`` are ``[..., k]``; ``num_classes``, ``class_axis_name`` and
    ``batch_axis_name`` as in :func:`check_labels`.

    Messages: ``label_indices[3, 1] = 7 is outside [0, 5) with a non-zero weight (an entry of
    weight 0 may hold any index)``, ``label_weights[0, 2] is nan (NaN and +-inf are not
    allowed)``.
    """
    if _settings() is None:
        return
    indices, weights = jnp.asarray(indices), jnp.asarray(weights)
    k = num_classes
    if class_axis_name is not None:
        k = num_classes * jax.lax.axis_size(class_axis_name)
    bad = _labels_out_of_range(indices, k, None) & (weights != 0)
    at = _index_template(names[0], indices.ndim, "i")
    message = (
        f" = {{value}} is outside [0, {k}) with a non-zero weight (an entry of weight 0 may "
        "hold any index)"
    )
    _report(bad, at, message, indices, _shards(indices.ndim, (), None, batch_axis_name))
    check_finite(names[1], weights, -1, allow_neg_inf=False, batch_axis_name=batch_axis_name)


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
    if _settings() is None:
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
    if _settings() is None:
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
    The tolerance is :func:`checked`'s ``tolerance``, by default :func:`default_tolerance` of
    ``dtype``: the dtype the caller received ``p`` in (``p``'s own dtype if ``None``; pass it
    when ``p`` was already upcast, or bf16 labels would be held to float32's tolerance).
    ``where`` is the function's mask (raw or broadcast). Inside ``shard_map``, with
    ``class_axis_name`` (the leading axis of ``axis`` split over that mesh axis) the sums are
    taken over the whole distribution, and with it and ``batch_axis_name`` (the leading other
    dim split over that mesh axis) the index named is the global one.

    Messages: ``labels[1, 2] = -0.1 is negative``, ``labels[1, :] sums to 0.8, not 1
    (tolerance 0.001)``, ``log_probs[0, :] exp-sums to 2, not 1 (tolerance 0.001)``.
    """
    settings = _settings()
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


# ----------------------------------------------------------------------------------------------
# The wrapper.


def _is_jitted(fn) -> bool:
    return isinstance(fn, type(jax.jit(abs))) and hasattr(fn, "__wrapped__")


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def checked(
    fn: Callable,
    *,
    tolerance: float | None = None,
    errors: frozenset = checkify.user_checks,
) -> Callable:
    r"""Wrap ``fn`` so that jaxce's value checks run, and raise :class:`CheckError` on the first.

    ``fn`` is any function that calls jaxce, jitted or not, with any JAX transforms inside it
    (``jax.jit``, ``jax.grad``, ``jax.vmap``, ``lax.scan``). Inside the wrapper every jaxce
    function checks its data:

    - integer labels are in ``[0, K)`` or equal ``ignore_index``;
    - soft labels and probabilities are finite, non-negative and sum to 1 along the class axis
      within ``tolerance`` (log-probabilities: exp-sum to 1);
    - logits and log-probabilities are not NaN or :math:`+\infty` (:math:`-\infty`, an
      impossible class, is allowed); so is the bias of
      :func:`~jaxce.linear_softmax_cross_entropy`, whose ``x`` and ``w`` hold no
      :math:`\pm\infty` either.

    Masked classes and examples whose classes are all masked are not checked. The first
    failing check (in program order, then the first element in C order) raises
    :class:`CheckError`, a ``ValueError``, naming the array, the index and the value, e.g.
    ``jaxce.checked: labels[3] = 7 is outside [0, 5) (ignore_index=None)``. Indices refer to
    the array the jaxce function received: under ``jax.vmap`` they are within one example,
    under ``lax.scan`` or ``lax.fori_loop`` within one step. Inside ``shard_map``, the arrays
    split over ``class_axis_name`` and ``batch_axis_name`` are named by their global index
    (the message ends with the failing device's mapped instance).

    Without the wrapper the functions carry no checks: nothing is added to their jaxprs.

    Args:
      fn: the function to check.
      tolerance: how far from 1 a distribution's sum may be; ``None`` is
        :math:`\max(10^{-3}, 4\varepsilon)` of its dtype (``1e-3`` for float32, ``0.031`` for
        bfloat16, whose rounding of :math:`1/3` alone is off by :math:`6 \cdot 10^{-4}`).
      errors: the :mod:`~jax.experimental.checkify` error set; add e.g.
        ``checkify.nan_checks`` to also catch NaNs produced inside ``fn``.

    Returns:
      A function with ``fn``'s signature and outputs. Array arguments (JAX or NumPy) are
      traced; every other argument (Python numbers, strings, options) is passed as is, so
      options need no ``static_argnums``. A jitted ``fn`` keeps its own ``static_argnums`` and
      is compiled again with checks (once per input signature); its unchecked compilation
      stays cached for calls outside the wrapper.

    Raises:
      CheckError: a value check failed.
      TypeError: the wrapper was called under a JAX transform (``jax.jit(checked(f))``):
        errors cannot be raised from traced code. Put the transforms inside instead:
        ``checked(jax.jit(f))``.

    Note:
      With ``class_axis_name`` (classes split over a mesh axis) the label range checked is
      the global one, ``K_local`` times the axis size. Checks cost a pass over the inputs
      and, for a jitted ``fn``, a second compilation: a debugging mode. While the wrapper
      traces ``fn``, JAX's partial evaluation keeps checks (as it keeps debug callbacks), or
      reverse-mode AD of a loop (gradient accumulation in ``lax.scan``) would drop them.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxce
      >>> loss = jax.jit(jaxce.softmax_cross_entropy_with_integer_labels)
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
      >>> print(jaxce.checked(loss)(logits, jnp.array([0, 1])).round(6))
      [0.407606 1.407606]
      >>> print(loss(logits, jnp.array([0, 3])).round(6))  # unchecked: NaN for a label with no class
      [0.407606      nan]
      >>> jaxce.checked(loss)(logits, jnp.array([0, 3]))
      Traceback (most recent call last):
      ...
      jaxce._checked.CheckError: jaxce.checked: labels[1] = 3 is outside [0, 3) (ignore_index=None)
      >>> jaxce.checked(jaxce.softmax_cross_entropy)(logits, jnp.array([[0.5, 0.5, 0.0]] * 2) * 0.9)
      Traceback (most recent call last):
      ...
      jaxce._checked.CheckError: jaxce.checked: labels[0, :] sums to 0.9, not 1 (tolerance 0.001)
    """
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
            raise TypeError(f"tolerance must be a Python number or None, got {tolerance!r}")
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be finite and >= 0, got {tolerance!r}")
        tolerance = float(tolerance)
    settings = _Settings(tolerance)
    # Without the jit-key state, a jitted fn would reuse its unchecked trace: run its Python.
    target = fn.__wrapped__ if _STATE is None and _is_jitted(fn) else fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        where = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
        dynamic = [leaves[i] for i in where]
        if any(isinstance(x, jax.core.Tracer) for x in dynamic):
            raise TypeError(_UNDER_TRANSFORM)

        def inner(dynamic):
            merged = list(leaves)
            for i, x in zip(where, dynamic):
                merged[i] = x
            a, k = jax.tree.unflatten(treedef, merged)
            return target(*a, **k)

        with _active(settings), _checks_survive_partial_eval():
            err, out = checkify.checkify(inner, errors=errors)(dynamic)
        try:
            exc = err.get_exception()
        except jax.errors.ConcretizationTypeError:
            raise TypeError(_UNDER_TRANSFORM) from None
        if exc is not None:
            raise CheckError(_message(exc))
        return out

    return wrapper


def _message(exc) -> str:
    """The failed check's own message (without checkify's suffix)."""
    mapping = getattr(exc, "error_mapping", None)  # from inside shard_map / pmap
    if mapping:
        index, first = min(mapping.items())
        return f"{_message(first)} (in mapped instance {', '.join(map(str, index))})"
    fmt = getattr(exc, "fmt_string", None)
    return str(exc) if fmt is None else fmt.format(*exc.args, **exc.kwargs)


_UNDER_TRANSFORM = (
    "jaxce.checked(fn) was called under a JAX transform (jit, grad, vmap) and cannot raise "
    "from traced code; put the transforms inside: jaxce.checked(jax.jit(fn))"
)
