r"""Information measures: surprisal, entropy, cross-entropy and KL divergence.

Conventions (REFERENCE.md section 2): :math:`0 \log 0 = 0`, and :math:`p > 0` where
:math:`q = 0` gives :math:`+\infty`. A term whose derivative is infinite at 0 (:math:`p \log p`
in the entropy and the KL divergence, :math:`p \log q` in p where :math:`q = 0`) has gradient 0
there; the cross-entropy, linear in p, has its finite derivative :math:`-\log q_i` also where
:math:`p_i = 0`. ``base`` picks the unit: ``None`` nats, ``2`` bits, ``10`` hartleys.
Entries masked by ``where`` take no part whatever they hold (NaN, inf): their gradient is 0.
A sum over no outcomes (a class axis of size 0, or a fully masked slice) is 0.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._softmax import log_probabilities, masked_fill, prepare, probabilities
from ._validation import check_floating, compute_dtype, log_base
from ._value_checks import check_distribution, check_finite, check_unit_interval


def xlogy(x: jax.Array, y: jax.Array) -> jax.Array:
    r""":math:`x \log y`, exactly 0 with zero gradients wherever :math:`x = 0`.

    The inner ``where`` keeps ``log(0)`` out of the computation that is differentiated (the
    "double where"): otherwise its infinite derivative times the outer zero would be NaN.
    """
    nonzero = x != 0
    return jnp.where(nonzero, x * jnp.log(jnp.where(nonzero, y, 1.0)), 0.0)


def weighted_log(x: jax.Array, y: jax.Array) -> jax.Array:
    r""":math:`x \log y` as the linear function of x it is for a fixed y: its derivative in x is
    :math:`\log y` also where x = 0 (:func:`xlogy`'s is 0 there), and 0 where y = 0.

    Where y = 0 the value is :math:`x \cdot (-\infty)` (0 for x = 0), a constant: there the
    term is infinite for any x > 0, and its gradient is 0 (NaN-free).
    """
    positive = y > 0
    log_y = jnp.log(jnp.where(positive, y, 1.0))
    at_zero = lax.stop_gradient(jnp.where(x != 0, x * -jnp.inf, 0.0))
    return jnp.where(positive, x * log_y, at_zero)


def xdiff(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    r""":math:`x (a - b)`, exactly 0 with zero gradients wherever :math:`x = 0` (even if a, b are -inf)."""
    nonzero = x != 0
    return jnp.where(nonzero, x * (jnp.where(nonzero, a, 0.0) - jnp.where(nonzero, b, 0.0)), 0.0)


def _distributions(axis, where, probabilities=True, **arrays):
    # Check and upcast arrays of one (broadcast) shape; return them with the mask. In checked
    # mode, probability arrays are checked to be distributions (at their own dtype's tolerance).
    arrays = {name: jnp.asarray(a) for name, a in arrays.items()}
    for name, a in arrays.items():
        check_floating(name, a)
    try:
        shape = jnp.broadcast_shapes(*(a.shape for a in arrays.values()))
    except ValueError:
        shapes = ", ".join(f"{n} {a.shape}" for n, a in arrays.items())
        raise ValueError(f"shapes do not broadcast: {shapes}") from None
    dtype = compute_dtype(jnp.result_type(*arrays.values()))
    _, _, mask, axes = prepare(jnp.zeros(shape, dtype), axis, where)
    # Masked entries are 0 before any arithmetic (the double where): whatever they hold (NaN,
    # inf, a negative number) reaches neither the value nor the gradient.
    out = [
        masked_fill(jnp.broadcast_to(a.astype(dtype), shape), mask, 0.0) for a in arrays.values()
    ]
    for name, a, given in zip(arrays, out, arrays.values()):
        if probabilities:
            check_distribution(name, a, axes, where=mask, dtype=given.dtype)
        else:
            check_finite(name, a, axes, where=mask)
    return out, mask, axes


def information(p: ArrayLike, *, base: float | None = None) -> jax.Array:
    r"""Information (surprisal) :math:`I(p) = -\log_b p`, elementwise.

    Rare events carry more information; :math:`I(0) = +\infty`.

    Args:
      p: probabilities (any shape).
      base: logarithm base (``None`` nats, ``2`` bits, ``10`` hartleys).

    Returns:
      :math:`-\log_b p` elementwise, in float32 (or wider).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.information(jnp.array([0.7, 0.2, 0.1]), base=10))
      [0.1549 0.6990 1.0000]
    """
    p = jnp.asarray(p)
    check_floating("p", p)
    check_unit_interval("p", p)
    scale = log_base(base)
    return -jnp.log(p.astype(compute_dtype(p.dtype))) / scale


def entropy(
    p: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    base: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Shannon entropy :math:`H(p) = -\sum_i p_i \log_b p_i`.

    Args:
      p: probabilities along ``axis``.
      axis: axis or axes that hold the outcomes.
      base: logarithm base (``None`` nats, ``2`` bits, ``10`` hartleys).
      where: boolean mask broadcastable to ``p``; masked entries take no part.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> p = jnp.array([0.7, 0.2, 0.1])
      >>> print(jaxce.entropy(p), jaxce.entropy(p, base=2), jaxce.entropy(p, base=10))
      0.8018186 1.1567796 0.34822536
    """
    scale = log_base(base)
    (p,), _, axes = _distributions(axis, where, p=p)
    return -jnp.sum(xlogy(p, p), axis=axes) / scale


def cross_entropy(
    p: ArrayLike,
    q: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    base: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Cross-entropy :math:`H(p, q) = -\sum_i p_i \log_b q_i = H(p) + D_{KL}(p \| q)`.

    Args:
      p: probabilities along ``axis``.
      q: probabilities along ``axis``, broadcastable with ``p``.
      axis: axis or axes that hold the outcomes.
      base: logarithm base (``None`` nats, ``2`` bits, ``10`` hartleys).
      where: boolean mask broadcastable to ``p``; masked entries take no part.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> q = jnp.array([0.7, 0.2, 0.1])
      >>> print(jaxce.cross_entropy(jnp.array([1.0, 0.0, 0.0]), q, base=10))
      0.15490197
    """
    scale = log_base(base)
    (p, q), _, axes = _distributions(axis, where, p=p, q=q)
    return -jnp.sum(weighted_log(p, q), axis=axes) / scale


def kl_divergence(
    p: ArrayLike,
    q: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    base: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence :math:`D_{KL}(p \| q) = \sum_i p_i (\log_b p_i - \log_b q_i)`.

    0 when :math:`p = q`, never negative, not symmetric; :math:`+\infty` where
    :math:`p_i > 0 = q_i`. (``optax.kl_divergence(log_predictions, targets)`` takes the
    opposite order, on log-probabilities.)

    Args:
      p: probabilities along ``axis``.
      q: probabilities along ``axis``, broadcastable with ``p``.
      axis: axis or axes that hold the outcomes.
      base: logarithm base (``None`` nats, ``2`` bits, ``10`` hartleys).
      where: boolean mask broadcastable to ``p``; masked entries take no part.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> p, q = jnp.array([0.5, 0.5]), jnp.array([0.9, 0.1])
      >>> print(jaxce.kl_divergence(p, q, base=2))
      0.7369656
    """
    scale = log_base(base)
    (p, q), _, axes = _distributions(axis, where, p=p, q=q)
    return jnp.sum(xlogy(p, p) - xlogy(p, q), axis=axes) / scale


def softmax_entropy(
    logits: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    base: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Entropy of :math:`\operatorname{softmax}(z)`, from the logits: :math:`-\sum_i p_i \log p_i`
    with :math:`\log p = z - \operatorname{lse}(z)`.

    :math:`-\infty` logits (impossible classes) are allowed: their term is exactly 0, in value
    and gradient, and no :math:`\log 0` is ever taken.

    Args:
      logits: floating logits; ``axis`` holds the classes.
      axis: axis or axes that hold the classes.
      base: logarithm base (``None`` nats, ``2`` bits, ``10`` hartleys).
      where: boolean mask broadcastable to the logits; masked classes take no part.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.softmax_entropy(jnp.array([0.0, 0.0, -jnp.inf]), base=2))
      1.0
    """
    scale = log_base(base)
    _, z, mask, axes = prepare(logits, axis, where, name="logits")
    check_finite("logits", z, axes, where=mask)
    log_p = log_probabilities(z, mask, axes)
    return -jnp.sum(xdiff(probabilities(z, mask, axes), log_p, 0.0), axis=axes) / scale


def softmax_kl_divergence(
    p_logits: ArrayLike,
    q_logits: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    base: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r""":math:`D_{KL}(\operatorname{softmax}(z_p) \| \operatorname{softmax}(z_q))` from the logits.

    Args:
      p_logits: floating logits of the distribution p.
      q_logits: floating logits of q, broadcastable with ``p_logits``.
      axis: axis or axes that hold the classes.
      base: logarithm base (``None`` nats, ``2`` bits, ``10`` hartleys).
      where: boolean mask broadcastable to the logits; masked classes take no part.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> z = jnp.array([2.0, 1.0, 0.0])
      >>> print(jaxce.softmax_kl_divergence(z, z))
      0.0
    """
    scale = log_base(base)
    (zp, zq), mask, axes = _distributions(
        axis, where, probabilities=False, p_logits=p_logits, q_logits=q_logits
    )
    log_p = log_probabilities(zp, mask, axes)
    log_q = log_probabilities(zq, mask, axes)
    return jnp.sum(xdiff(probabilities(zp, mask, axes), log_p, log_q), axis=axes) / scale
