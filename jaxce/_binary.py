"""Sigmoid (binary) cross-entropy, with a closed-form backward pass."""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._options import reduce_losses
from ._softmax import masked_fill
from ._validation import (
    broadcast_mask,
    check_floating,
    check_nonnegative_option,
    check_reduction,
    compute_dtype,
    log_base,
)
from ._value_checks import check_finite, check_unit_interval


@jax.custom_vjp
def _binary_cross_entropy(z, y, pos_weight):
    return _binary_cross_entropy_fwd(z, y, pos_weight)[0]


def _nonzero_times(a, x):
    # a * x, exactly 0 where a == 0 even when x is infinite (a weight of 0 removes the term).
    return jnp.where(a != 0, a * jnp.where(a != 0, x, 0.0), 0.0)


def _binary_cross_entropy_fwd(z, y, pos_weight):
    # pos_weight * y * softplus(-z) + (1 - y) * softplus(z): -log(sigmoid) and -log(1 - sigmoid)
    # without forming the sigmoid; finite for any z with labels that put no mass on the
    # impossible side (z = +inf, y = 1 gives 0).
    loss = _nonzero_times(pos_weight * y, jax.nn.softplus(-z)) + _nonzero_times(
        1.0 - y, jax.nn.softplus(z)
    )
    return loss, (z, y, pos_weight)


def _binary_cross_entropy_bwd(residuals, g):
    z, y, pos_weight = residuals
    a = pos_weight * y
    # sigma(z) (a + 1 - y) - a, as (1 - y) sigma(z) - a sigma(-z): no 1 - 1 cancellation where
    # sigma(z) rounds to 1 (y = 1 and z > 17 in float32 gave 0 for -sigma(-z)).
    dz = g * ((1.0 - y) * jax.nn.sigmoid(z) - a * jax.nn.sigmoid(-z))
    dy = _nonzero_times(g, pos_weight * jax.nn.softplus(-z) - jax.nn.softplus(z))
    dpos = _nonzero_times(g, _nonzero_times(y, jax.nn.softplus(-z)))
    return dz, dy, dpos


_binary_cross_entropy.defvjp(_binary_cross_entropy_fwd, _binary_cross_entropy_bwd)


def _broadcast_operand(name, x, shape, dtype, mask):
    """``x`` checked, cast to ``dtype``, broadcast to ``shape``, and 0 where ``mask`` is False."""
    x = jnp.asarray(x)
    check_floating(name, x)
    try:
        x = jnp.broadcast_to(x.astype(dtype), shape)
    except ValueError:
        raise ValueError(f"{name} shape {x.shape} is not broadcastable to logits shape {shape}") from None
    return masked_fill(x, mask, 0.0)


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    base: float | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Binary cross-entropy of a sigmoid, elementwise (also multi-label: one sigmoid per class).

    .. math::
        e = -\big(\beta\, y \log \sigma(z) + (1 - y) \log(1 - \sigma(z))\big),
        \qquad \frac{\partial e}{\partial z} = \sigma(z) (\beta y + 1 - y) - \beta y

    which is :math:`\sigma(z) - y` for :math:`\beta = 1`: the sigmoid's derivative cancels, so
    a confidently wrong prediction still learns fast (REFERENCE.md section 4).

    Args:
      logits: floating logits.
      labels: targets in [0, 1], broadcastable to ``logits`` (differentiable).
      where: boolean mask broadcastable to ``logits``; masked elements give 0 and do not count,
        whatever any operand holds there (NaN, inf): their gradients are 0.
      pos_weight: :math:`\beta`, the weight of the positive term (PyTorch's ``pos_weight``),
        broadcastable to ``logits`` (e.g. one per class).
      sample_weights: broadcastable to ``logits``; multiplies each element's loss.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; labels become
        :math:`(1 - \varepsilon) y + \varepsilon / 2`.
      base: logarithm base; loss and gradient are divided by :math:`\ln b`.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over unmasked elements, weighted).

    Returns:
      The loss in float32 (or wider), elementwise or reduced.

    Note:
      Finite for any logit, :math:`\pm\infty` included, whenever the label allows it:
      :math:`z = +\infty` with :math:`y = 1` gives loss 0 and gradient 0.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> z = jnp.log(jnp.array([0.98 / 0.02, 0.0001 / 0.9999]))  # sigmoid(z) = 0.98, 0.0001
      >>> print(jaxce.sigmoid_binary_cross_entropy(z, jnp.array([1.0, 1.0]), base=2).round(5))
      [ 0.02915 13.28771]
    """
    check_reduction(reduction)
    scale = log_base(base)
    eps = check_nonnegative_option("label_smoothing", label_smoothing, upper=1.0)
    z = jnp.asarray(logits)
    check_floating("logits", z)
    dtype = compute_dtype(z.dtype)
    y = jnp.asarray(labels)
    check_floating("labels", y)
    try:
        shape = jnp.broadcast_shapes(z.shape, y.shape)
    except ValueError:
        raise ValueError(f"labels shape {y.shape} does not broadcast with logits shape {z.shape}") from None
    mask = broadcast_mask(where, shape, ())
    # Masked elements take no part, whatever they hold (NaN, inf): every operand is zeroed there
    # before any arithmetic (the double where), so nothing they hold reaches a gradient.
    z, y = (masked_fill(jnp.broadcast_to(a.astype(dtype), shape), mask, 0.0) for a in (z, y))
    check_finite("logits", z)
    check_unit_interval("labels", y)
    if eps:
        y = (1.0 - eps) * y + eps / 2.0
    beta = jnp.ones(shape, dtype) if pos_weight is None else _broadcast_operand(
        "pos_weight", pos_weight, shape, dtype, mask
    )
    loss = _binary_cross_entropy(z, y, beta)
    counted = jnp.ones(shape, bool) if mask is None else mask
    loss = jnp.where(counted, loss, 0.0)
    norm = jnp.ones(shape, dtype)
    if sample_weights is not None:
        weights = _broadcast_operand("sample_weights", sample_weights, shape, dtype, mask)
        loss, norm = loss * weights, norm * weights
    return reduce_losses(loss, counted, norm, reduction, scale)
