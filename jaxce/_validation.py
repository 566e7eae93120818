"""Trace-time checks shared by every public function.

Everything here looks only at static information (shapes, dtypes, Python option values), so it
raises in Python while JAX traces, with the offending shapes or values in the message. Checks that
need the data (a label out of range) live in :mod:`jaxce._checked`.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

REDUCTIONS = ("none", "sum", "mean")


def canonical_axes(axis: int | Sequence[int], ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Return ``axis`` as a sorted tuple of non-negative ints, or raise for a bad axis."""
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
    return tuple(sorted(out))


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


def log_base(base: float | None) -> float:
    """``ln(base)``, the factor that turns nats into units of ``base`` (1 for ``None``)."""
    if base is None:
        return 1.0
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise TypeError(f"base must be a Python number or None, got {base!r}")
    if not base > 0 or base == 1 or not math.isfinite(base):
        raise ValueError(f"base must be finite, > 0 and != 1, got {base!r}")
    return math.log(base)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_nonnegative_option(name: str, value: float, upper: float | None = None) -> float:
    """A static float option in ``[0, upper]`` (``upper`` excluded when given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {value!r}")
    if not value >= 0 or (upper is not None and not value < upper) or not math.isfinite(value):
        bound = f"[0, {upper})" if upper is not None else "[0, inf)"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return float(value)


def check_softcap(softcap: float | None) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"logit_softcap must be a Python number or None, got {softcap!r}")
    if not softcap > 0 or not math.isfinite(softcap):
        raise ValueError(f"logit_softcap must be finite and > 0, got {softcap!r}")
    return float(softcap)


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
