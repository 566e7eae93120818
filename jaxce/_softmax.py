r"""The softmax family: logsumexp, softmax, log-softmax and the softmax Jacobian.

All of them shift by the maximum before exponentiating, compute in float32 or wider, and give
a finite answer for slices that are all :math:`-\infty` or fully masked (where jax.nn gives
NaN values or NaN gradients, jax issue 6811).
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._validation import broadcast_mask, canonical_axes, check_floating, compute_dtype, static_bool


def masked_fill(x: jax.Array, mask: jax.Array | None, value: float = -jnp.inf) -> jax.Array:
    """``x`` with the entries where ``mask`` is False replaced by ``value``."""
    return x if mask is None else jnp.where(mask, x, value)


def finite_or_zero(x: jax.Array) -> jax.Array:
    """``x`` where finite, else 0: a safe shift for slices whose maximum is :math:`-\\infty`."""
    return jnp.where(jnp.isfinite(x), x, 0.0)


def _shifted_exp(x: jax.Array, mask: jax.Array | None, shift: jax.Array) -> jax.Array:
    # exp(x - shift) with masked entries exactly 0; a non-finite shift (an empty slice) is
    # replaced by 0 so that the empty slice gives exp(-inf) = 0 rather than exp(nan).
    return masked_fill(jnp.exp(x - finite_or_zero(shift)), mask, 0.0)


def _peak(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    r"""The maximum of the unmasked entries over ``axes`` (kept), :math:`-\infty` on empty slices.

    ``initial=-inf`` makes a class axis of size 0 an empty slice too, as in ``jax.nn.logsumexp``.
    """
    return jnp.max(masked_fill(x, mask), axis=axes, keepdims=True, initial=-jnp.inf)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _logsumexp(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    # keepdims result; mask may be None.
    peak = _peak(x, mask, axes)
    return jnp.log(jnp.sum(_shifted_exp(x, mask, peak), axis=axes, keepdims=True)) + finite_or_zero(
        peak
    )


@_logsumexp.defjvp
def _logsumexp_jvp(axes, primals, tangents):
    # d lse = sum(p * dx), with p = 0 on masked entries and on empty slices: the gradient of an
    # all -inf slice is 0, not the 0 * inf = NaN that autodiff of log(sum(exp)) produces.
    x, mask = primals
    dx, _ = tangents
    return _logsumexp(x, mask, axes), jnp.sum(_softmax(x, mask, axes) * dx, axis=axes, keepdims=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _softmax(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    x = shift_by_peak(x, mask, axes)
    return _shifted_exp(x, mask, _logsumexp(x, mask, axes))


def shift_by_peak(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    r"""``x - max(x)`` (a constant shift: softmax and log-softmax do not change).

    Working relative to the peak keeps precision: for logits near 1e4, ``x - lse`` would
    carry lse's float32 rounding (ulp 1e-3) into every probability, while ``x - max`` is exact
    near the peak and ``lse(x - max)`` is small. ``stop_gradient``: the shift is a constant.
    """
    peak = _peak(x, mask, axes)
    # An empty slice (peak -inf) is not shifted; a +inf peak makes the slice NaN, as it should.
    return x - lax.stop_gradient(jnp.where(peak == -jnp.inf, 0.0, peak))


@_softmax.defjvp
def _softmax_jvp(axes, primals, tangents):
    # The closed form J dx = p * (dx - <p, dx>), J = diag(p) - p p^T.
    x, mask = primals
    dx, _ = tangents
    p = _softmax(x, mask, axes)
    return p, p * (dx - jnp.sum(p * dx, axis=axes, keepdims=True))


def logsumexp(
    x: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
    keepdims: bool = False,
) -> jax.Array:
    r"""Log of the sum of exponentials, computed without overflow.

    .. math::
        \operatorname{lse}(x) = m + \log \sum_i e^{x_i - m}, \qquad m = \max_i x_i

    Args:
      x: floating input.
      axis: axis or axes to reduce.
      where: boolean mask broadcastable to ``x``; masked entries take no part.
      keepdims: keep the reduced axes with size 1.

    Returns:
      The logsumexp, in ``x``'s dtype.

    Note:
      A slice that is all :math:`-\infty` or fully masked gives :math:`-\infty` with a zero
      gradient (``jax.nn.logsumexp`` gives a NaN gradient there), and so does a class axis of
      size 0. The gradient is ``softmax(x)``.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.logsumexp(jnp.array([2.0, 1.0, 0.0])))
      2.40761
      >>> print(jaxce.logsumexp(jnp.array([-jnp.inf, -jnp.inf])))
      -inf
    """
    keepdims = static_bool("keepdims", keepdims)
    x, xc, mask, axes = prepare(x, axis, where)
    out = _logsumexp(xc, mask, axes)
    if not keepdims:
        out = jnp.squeeze(out, axes)
    return out.astype(x.dtype)


def softmax(
    x: ArrayLike, axis: int | Sequence[int] = -1, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Softmax: :math:`p_i = e^{x_i} / \sum_j e^{x_j}`, shifted by the maximum.

    Args:
      x: floating input.
      axis: axis or axes that hold the classes.
      where: boolean mask broadcastable to ``x``; masked entries get probability 0.

    Returns:
      Probabilities in ``x``'s dtype, summing to 1 over ``axis`` (to 0 on a fully masked or
      all :math:`-\infty` slice, which has no NaN).

    Note:
      The derivative is the closed form :math:`J = \operatorname{diag}(p) - p p^\top`
      (see :func:`softmax_jacobian`).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.softmax(jnp.array([2.0, 1.0, 0.0])))
      [0.665241 0.244728 0.090031]
      >>> print(jaxce.softmax(jnp.array([1.0, 1.0]), where=jnp.array([False, False])))
      [0. 0.]
    """
    x, xc, mask, axes = prepare(x, axis, where)
    return _softmax(xc, mask, axes).astype(x.dtype)


def log_softmax(
    x: ArrayLike, axis: int | Sequence[int] = -1, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Log-softmax :math:`x_i - \operatorname{lse}(x)`, without forming the softmax.

    Args:
      x: floating input.
      axis: axis or axes that hold the classes.
      where: boolean mask broadcastable to ``x``; masked entries are :math:`-\infty`.

    Returns:
      Log-probabilities in ``x``'s dtype. A fully masked or all :math:`-\infty` slice is all
      :math:`-\infty` (no NaN).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.log_softmax(jnp.array([0.0, 0.0])))  # log(1/2)
      [-0.693147 -0.693147]
      >>> print(jaxce.log_softmax(jnp.array([0.0, 0.0]), where=jnp.array([True, False])))
      [  0. -inf]
    """
    x, xc, mask, axes = prepare(x, axis, where)
    return log_probabilities(xc, mask, axes).astype(x.dtype)


def log_probabilities(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    """Log-softmax in ``x``'s dtype; -inf on masked entries and on empty slices."""
    x = shift_by_peak(x, mask, axes)
    return masked_fill(x - finite_or_zero(_logsumexp(x, mask, axes)), mask)


def probabilities(x: jax.Array, mask: jax.Array | None, axes: tuple[int, ...]) -> jax.Array:
    """Softmax in ``x``'s dtype with the closed-form derivative; 0 on masked entries."""
    return _softmax(x, mask, axes)


def prepare(x: ArrayLike, axis, where, name: str = "x"):
    """Check ``x``, ``axis`` and ``where``; return ``(x, x in compute dtype, mask, axes)``."""
    x = jnp.asarray(x)
    check_floating(name, x)
    axes = canonical_axes(axis, x.ndim)
    mask = broadcast_mask(where, x.shape, axes)
    return x, x.astype(compute_dtype(x.dtype)), mask, axes


def move_axes_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Move ``axes`` to the end in the order given and flatten them (C order) into one axis of size K."""
    batch = tuple(i for i in range(x.ndim) if i not in axes)
    x = jnp.transpose(x, batch + axes)
    return x.reshape(x.shape[: len(batch)] + (math.prod(x.shape[len(batch) :]),))


def softmax_jacobian(x: ArrayLike, axis: int | Sequence[int] = -1) -> jax.Array:
    r"""The Jacobian of :func:`softmax` in closed form, :math:`J = \operatorname{diag}(p) - p p^\top`.

    .. math::
        \frac{\partial p_i}{\partial x_i} = p_i (1 - p_i), \qquad
        \frac{\partial p_i}{\partial x_j} = -p_i p_j \quad (i \ne j)

    Args:
      x: floating input.
      axis: axis or axes that hold the classes.

    Returns:
      An array of shape ``batch_shape + class_shape + class_shape`` where ``batch_shape`` is
      ``x``'s shape without ``axis`` and ``class_shape`` the shape of ``axis``: for
      ``axis=-1`` that is ``x.shape + (K,)``, entry ``[..., i, j]`` being
      :math:`\partial p_i / \partial x_j` for one slice, as ``jax.jacfwd(jaxce.softmax)``
      gives on that slice.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.softmax_jacobian(jnp.array([0.0, 0.0])))
      [[ 0.25 -0.25]
       [-0.25  0.25]]
    """
    x, xc, _, axes = prepare(x, axis, None)
    flat = move_axes_last(xc, axes)
    p = _softmax(flat, None, (flat.ndim - 1,))
    jac = jnp.eye(p.shape[-1], dtype=p.dtype) * p[..., None] - p[..., :, None] * p[..., None, :]
    batch_shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    class_shape = tuple(x.shape[i] for i in axes)
    return jac.reshape(batch_shape + class_shape + class_shape).astype(x.dtype)
