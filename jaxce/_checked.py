r"""Checked mode: value checks on the data, opt-in, built on :mod:`jax.experimental.checkify`.

The public functions check shapes, dtypes and options in Python while JAX traces (see
:mod:`jaxce._validation`). Problems that need the data (a label out of range, labels that are
not a distribution, a NaN logit) cannot raise there: the values are tracers. jaxce documents
what such inputs give (NaN, or a loss computed from whatever the labels hold) and checks them
only inside :func:`checked`.

Each public function calls the hooks of :mod:`jaxce._value_checks` (``check_labels``,
``check_distribution``, ``check_finite``). Outside :func:`checked` a hook returns at once, in
Python, and puts nothing in the jaxpr: the unchecked functions cost nothing. Inside, it emits
a :func:`jax.experimental.checkify.check` whose message names the first offending element (in
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
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import checkify

__all__ = ["CheckError", "checked"]


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


def active_settings() -> _Settings | None:
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
    return active_settings() is not None


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
