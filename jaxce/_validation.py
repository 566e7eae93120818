"""Trace-time checks shared by every public function.

Everything here looks only at static information (shapes, dtypes, Python option values), so it
raises in Python while JAX traces, with the offending shapes or values in the message. Checks that
need the data (a label out of range) live in :mod:`jaxce._checked`.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "sum", "mean")


def canonical_axes(axis: int | Sequence[int], ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Return ``axis`` as a tuple of non-negative ints in the order given, or raise for a bad axis.

    The order is kept (as optax and NumPy's ``normalize_axis_tuple`` keep it): several class
    axes are flattened in that order (:func:`jaxce._softmax.move_axes_last`), so an integer
    label is a C-order index into the class shape as listed, ``axis=(3, 2)`` making axis 3 the
    major one. Reductions over the axes do not depend on it.

    Examples:
      >>> canonical_axes((-1, -2), 4), canonical_axes(1, 3)
      ((3, 2), (1,))
    """
    axes = (axis,) if isinstance(axis, int) else axis
    if not isinstance(axes, (tuple, list)) or not all(
        isinstance(a, int) and not isinstance(a, bool) for a in axes
    ):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {axis!r}")
    if not axes:
        raise ValueError(f"{name} must name at least one axis, got {axis!r}")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{name} {a} is out of range for an input of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} {axis!r} repeats an axis")
    return tuple(out)


def check_floating(name: str, x: jax.Array) -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating dtype."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")


def check_integer(name: str, x: jax.Array) -> None:
    """Raise ``TypeError`` unless ``x`` has an integer dtype."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")


def check_shape(name: str, x: jax.Array, shape: tuple[int, ...], what: str) -> None:
    """Raise ``ValueError`` unless ``x.shape == shape`` (``what`` says where the shape comes from)."""
    if x.shape != tuple(shape):
        raise ValueError(f"{name} shape {x.shape} does not match {what} {tuple(shape)}")


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype the numerics run in: at least float32 (bf16 and f16 are upcast)."""
    return jnp.promote_types(dtype, jnp.float32)


def _static_scalar(name: str, value, integer: bool, optional: bool):
    """``value`` as a Python int (``integer``) or float, or raise ``TypeError`` naming ``name``.

    Accepted: a Python number, a NumPy scalar or 0-d array, or a concrete 0-d JAX array, of an
    integer dtype (``integer``) or of a real dtype (not bool, not complex); ``None`` when
    ``optional``. A traced value is refused: an option shapes the computation, so it must be
    known while JAX traces.
    """
    if optional and value is None:
        return None
    kind, cast = ("int", int) if integer else ("number", float)
    or_none = " or None" if optional else ""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be static (a Python {kind}{or_none}, or a concrete NumPy or JAX scalar), "
            f"got the traced value {value}: pass it as a Python {kind}, or mark it static "
            "(jax.jit's static_argnames)"
        )
    if isinstance(value, int if integer else (int, float)) and not isinstance(value, bool):
        return cast(value)  # (before NumPy, which holds no int beyond 64 bits)
    try:
        array = np.asarray(value)
    except ValueError:  # a ragged sequence
        array = np.asarray(None)
    dtypes = (jnp.integer,) if integer else (jnp.integer, jnp.floating)
    if array.ndim == 0 and any(jnp.issubdtype(array.dtype, d) for d in dtypes):
        return cast(array)
    raise TypeError(
        f"{name} must be a Python {kind}{or_none}, got {value!r} "
        f"(a NumPy or concrete JAX {'integer' if integer else 'real'} scalar works too)"
    )


def static_number(name: str, value, *, optional: bool = False) -> float | None:
    """A static real option as a Python float (``None`` passes through when ``optional``).

    Takes any concrete real scalar: a Python int or float, a NumPy scalar or 0-d array, a
    concrete 0-d JAX array. Raises ``TypeError`` for bools, strings, arrays of other shapes
    and traced values.

    Examples:
      >>> import numpy as np, jax.numpy as jnp
      >>> static_number("z_loss", np.float32(0.25)), static_number("z_loss", jnp.int32(2))
      (0.25, 2.0)
    """
    return _static_scalar(name, value, integer=False, optional=optional)


def static_int(name: str, value, *, optional: bool = False) -> int | None:
    """A static integer option as a Python int (``None`` passes through when ``optional``).

    As :func:`static_number`, but the value must have an integer type: ``2.0`` is refused.

    Examples:
      >>> import numpy as np
      >>> static_int("block_size", np.int64(8))
      8
    """
    return _static_scalar(name, value, integer=True, optional=optional)


def static_bool(name: str, value) -> bool:
    """A static flag as a Python bool: ``True``, ``False`` or a NumPy bool; anything else (a
    string, an array) is refused rather than read by its truth.

    Examples:
      >>> import numpy as np
      >>> static_bool("keepdims", np.True_)
      True
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def log_base(base: float | None) -> float:
    """``ln(base)``, the factor that turns nats into units of ``base`` (1 for ``None``)."""
    base = static_number("base", base, optional=True)
    if base is None:
        return 1.0
    if not base > 0 or base == 1 or not math.isfinite(base):
        raise ValueError(f"base must be finite, > 0 and != 1, got {base!r}")
    return math.log(base)


def check_reduction(reduction: str, segmented: bool = False) -> None:
    """``reduction`` is one of :data:`REDUCTIONS` (or ``"segment_mean"`` where ``segmented``)."""
    allowed = REDUCTIONS + ("segment_mean",) if segmented else REDUCTIONS
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


def check_nonnegative_option(name: str, value: float, upper: float | None = None) -> float:
    """A static float option in ``[0, upper]`` (``upper`` excluded when given)."""
    value = static_number(name, value)
    if not value >= 0 or (upper is not None and not value < upper) or not math.isfinite(value):
        bound = f"[0, {upper})" if upper is not None else "[0, inf)"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return value


def check_softcap(softcap: float | None) -> float | None:
    softcap = static_number("logit_softcap", softcap, optional=True)
    if softcap is None:
        return None
    # z / c is flushed to 0 where it is a float32 subnormal (|z| < c 2**-126: CPUs flush them):
    # c <= 2**100 keeps that error below 2**-26, where larger caps would zero logits near 0.
    if not 0 < softcap <= 2.0**100:
        raise ValueError(f"logit_softcap must be in (0, 2**100 = 1.3e30], got {softcap!r}")
    return softcap


def broadcast_mask(where, shape: tuple[int, ...], axes: tuple[int, ...], name: str = "where"):
    """Broadcast a boolean mask to ``shape``, optax's way.

    A mask with fewer dimensions than the input whose shape is the batch shape (the input's
    shape without ``axes``) masks whole examples, as in optax; any other mask broadcasts by
    NumPy's rules (so a mask of the class shape masks classes).
    """
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask, got dtype {where.dtype}")
    batch_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
    if where.ndim != len(shape) and where.shape == batch_shape:
        where = jnp.expand_dims(where, axes)
    try:
        return jnp.broadcast_to(where, shape)
    except ValueError:
        raise ValueError(
            f"{name} shape {where.shape} is not broadcastable to the input shape {shape}"
        ) from None
