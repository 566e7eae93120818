r"""optax.losses' names and signatures, a thin face over jaxce's kernels.

``import jaxce.losses as losses`` in place of ``import optax.losses as losses``: every name
this module shares with ``optax.losses`` (0.2.8) takes optax's positional arguments and
keyword names and gives optax's number, with no NaN where optax gives one (a :math:`-\infty`
logit or log-prediction with a zero label, ``0 * log 0``, an all :math:`-\infty` row), and with
jaxce's closed-form gradients. jaxce's own options stay keyword-only: the softmax and sigmoid
cross-entropies pass extra keywords (``label_smoothing``, ``z_loss``, ``ignore_index``,
``reduction``, ...) to :func:`jaxce.softmax_cross_entropy` and its siblings.

Beware: optax's :func:`kl_divergence` takes ``(log_predictions, targets)`` and returns
:math:`D_{KL}(\text{targets} \,\|\, \text{predictions})`, while the top-level
:func:`jaxce.kl_divergence` takes two probability vectors ``(p, q)`` and returns
:math:`D_{KL}(p \| q)`.

Differences from optax, all documented on the functions:

- losses on bf16/f16 inputs are computed and returned in float32 (optax returns the input
  dtype);
- the softmax cross-entropies are ``jax.custom_vjp`` functions: reverse mode and
  forward-over-reverse (``jax.hessian``) work, forward mode alone (``jax.jvp``, ``jacfwd``)
  does not;
- an integer label on a masked class (or a :math:`-\infty` logit) has probability 0 and gives
  :math:`+\infty`, where optax gives the meaningless finite ``lse(unmasked) - z_y``.

Examples:
  >>> import jax.numpy as jnp
  >>> import jaxce.losses as losses
  >>> logits = jnp.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
  >>> print(losses.softmax_cross_entropy(logits, jnp.array([[1.0, 0, 0], [0, 1.0, 0]])))
  [0.40760595 1.4076059 ]
  >>> print(losses.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])))
  [0.40760595 1.4076059 ]
  >>> # a -inf logit with label 0: optax gives nan here
  >>> print(losses.softmax_cross_entropy(jnp.array([0.0, -jnp.inf]), jnp.array([1.0, 0.0])))
  0.0
"""

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jax.scipy.special
from jax.typing import ArrayLike

from ._binary import sigmoid_binary_cross_entropy as _sigmoid_binary_cross_entropy
from ._cross_entropy import softmax_cross_entropy as _softmax_cross_entropy
from ._cross_entropy import (
    softmax_cross_entropy_with_integer_labels as _softmax_cross_entropy_with_integer_labels,
)
from ._information import xdiff, xlogy
from ._softmax import masked_fill
from ._softmax import softmax as _softmax
from ._validation import broadcast_mask, canonical_axes, check_floating, compute_dtype

__all__ = [
    "convex_kl_divergence",
    "generalized_kl_divergence",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "poly_loss_cross_entropy",
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]

Axis = int | Sequence[int] | None


def _class_axes(axis: Axis, ndim: int) -> int | tuple[int, ...]:
    """optax's ``axis`` for jaxce: ``None`` is every axis (one distribution over the array)."""
    return tuple(range(ndim)) if axis is None else axis


def _expanded_where(where: ArrayLike | None, axis, shape: tuple[int, ...]):
    """optax's reading of a ``where`` of another rank than the logits: expanded at ``axis`` (an
    int), so that a mask broadcastable to the batch shape leaves examples out (``[N, 1]`` of
    ``[N, T, K]`` logits). A mask that does not broadcast to the logits so, a per-class ``[K]``
    one (which optax refuses), keeps jaxce's reading."""
    if where is None or not isinstance(axis, int):
        return where
    where = jnp.asarray(where)
    if where.ndim == len(shape):
        return where
    expanded = jnp.expand_dims(where, axis)
    try:
        fits = jnp.broadcast_shapes(expanded.shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    return expanded if fits else where


def _floating(x: ArrayLike, name: str) -> jax.Array:
    x = jnp.asarray(x)
    check_floating(name, x)
    return x


def _like(labels: ArrayLike, dtype) -> jax.Array:
    """Labels as floats (optax multiplies or casts integer and bool labels without complaint)."""
    labels = jnp.asarray(labels)
    return labels if jnp.issubdtype(labels.dtype, jnp.floating) else labels.astype(dtype)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    **kwargs,
) -> jax.Array:
    r"""optax's ``softmax_cross_entropy``: :math:`-\sum_k y_k \log \operatorname{softmax}(z)_k`.

    :func:`jaxce.softmax_cross_entropy` with optax's positional ``where`` and ``axis=None``
    (all axes); ``labels`` broadcast against ``logits`` as in optax, and an empty class axis
    gives 0 as in optax. Extra keywords go to :func:`jaxce.softmax_cross_entropy`.

    Note:
      Finite where optax gives NaN: a :math:`-\infty` logit whose label is 0 contributes 0
      (value and gradient). Returns float32 for bf16/f16 logits.

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> print(losses.softmax_cross_entropy(jnp.array([2.0, 1.0, 0.0]), jnp.array([1.0, 0, 0])))
      0.407606
    """
    logits = _floating(logits, "logits")
    labels = _like(labels, logits.dtype)
    shape = jnp.broadcast_shapes(logits.shape, labels.shape)
    logits, labels = jnp.broadcast_to(logits, shape), jnp.broadcast_to(labels, shape)
    axis = _class_axes(axis, logits.ndim)
    axes = canonical_axes(axis, logits.ndim)
    if not kwargs and not all(shape[a] for a in axes):
        # No classes: optax's sum over nothing is 0 (jaxce's loss refuses an empty class axis).
        batch_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
        return jnp.zeros(batch_shape, compute_dtype(logits.dtype))
    where = _expanded_where(where, axis, shape)
    return _softmax_cross_entropy(logits, labels, axis, where=where, **kwargs)


def safe_softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike, **kwargs) -> jax.Array:
    r"""optax's ``safe_softmax_cross_entropy``: :func:`softmax_cross_entropy` over the last axis.

    jaxce's :func:`softmax_cross_entropy` is already safe (``0 log 0 = 0`` for
    :math:`-\infty` logits with zero labels), so the two are one function here.

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> z = jnp.array([[-jnp.inf, 0.0, 0.0], [-jnp.inf, 0.0, 0.0]])
      >>> print(losses.safe_softmax_cross_entropy(z, jnp.array([[0, 0.5, 0.5], [0.4, 0.3, 0.3]])))
      [0.693147      inf]
    """
    return softmax_cross_entropy(logits, labels, **kwargs)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    **kwargs,
) -> jax.Array:
    r"""optax's ``softmax_cross_entropy_with_integer_labels``: :math:`\operatorname{lse}(z) - z_y`.

    :func:`jaxce.softmax_cross_entropy_with_integer_labels` with optax's positional
    ``where``. With a tuple ``axis`` a label is a flat C-order index into the class axes in
    the order given (``axis=(3, 2)``: axis 3 is the major one), as in optax. Extra keywords
    (``ignore_index``, ``label_smoothing``, ...) go to jaxce.

    Note:
      A label on a masked class or a :math:`-\infty` logit gives :math:`+\infty` (its
      probability is 0; optax gives a finite number). Returns float32 for bf16/f16 logits.

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> z = jnp.arange(24.0).reshape(1, 2, 3, 4)
      >>> print(losses.softmax_cross_entropy_with_integer_labels(z, jnp.array([[5, 11]]), (2, 3)))
      [[6.4587 0.4587]]
    """
    if not isinstance(axis, (int, tuple)):
        raise ValueError(f"axis must be an int or a tuple of ints, got {type(axis)}")  # noqa: TRY004 (optax raises ValueError)
    where = _expanded_where(where, axis, jnp.shape(logits))
    return _softmax_cross_entropy_with_integer_labels(logits, labels, axis, where=where, **kwargs)


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: ArrayLike = 2.0,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``poly_loss_cross_entropy`` (Poly-1): cross-entropy plus :math:`\epsilon (1 - p_t)`.

    .. math::
        L = -\sum_k y_k \log p_k + \epsilon \sum_k y_k (1 - p_k)

    Both terms come from jaxce (:func:`jaxce.softmax_cross_entropy`, :func:`jaxce.softmax`)
    over the same mask.

    References:
      Leng et al., PolyLoss: A Polynomial Expansion Perspective of Classification Loss
      Functions, ICLR 2022.

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> z, y = jnp.array([[4.0, 2.0, 1.0], [0.0, 5.0, 1.0]]), jnp.array([[1.0, 0, 0], [0, 0.8, 0.2]])
      >>> print(losses.poly_loss_cross_entropy(z, y, epsilon=1.0).round(4))
      [0.3261 1.0407]
    """
    logits = _floating(logits, "logits")
    labels = _floating(labels, "labels")
    shape = jnp.broadcast_shapes(logits.shape, labels.shape)
    logits = jnp.broadcast_to(logits, shape).astype(compute_dtype(logits.dtype))
    labels = jnp.broadcast_to(labels, shape).astype(logits.dtype)
    axes = canonical_axes(_class_axes(axis, len(shape)), len(shape))
    mask = broadcast_mask(where, shape, axes)
    p = _softmax(logits, axes, where=mask)
    one_minus_pt = jnp.sum(masked_fill(labels, mask, 0.0) * (1.0 - p), axis=axes)
    return softmax_cross_entropy(logits, labels, axes, mask) + epsilon * one_minus_pt


def _operands(where, **arrays):
    """Floating arrays broadcast together in the compute dtype, 0 where ``where`` is False.

    ``where`` broadcasts by NumPy's rules, as optax's ``jnp.sum(..., where=where)`` does;
    zeroing masked entries before any arithmetic keeps what they hold out of the gradient.
    """
    arrays = [_floating(a, name) for name, a in arrays.items()]
    shape = jnp.broadcast_shapes(*(a.shape for a in arrays))
    dtype = compute_dtype(jnp.result_type(*arrays))
    mask = None if where is None else jnp.broadcast_to(jnp.asarray(where, bool), shape)
    return [masked_fill(jnp.broadcast_to(a.astype(dtype), shape), mask, 0.0) for a in arrays]


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``kl_divergence``: :math:`\sum_k t_k (\log t_k - \log q_k)`, predictions in log space.

    This is :math:`D_{KL}(t \| q)` for ``targets`` :math:`t` and ``log_predictions``
    :math:`\log q`: mind the order and the log space, the opposite of the top-level
    :func:`jaxce.kl_divergence` ``(p, q)`` on probabilities.

    Note:
      A zero target contributes 0 with zero gradients, even where the log-prediction is
      :math:`-\infty` (optax gives NaN there).

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> print(losses.kl_divergence(jnp.array([0.0, -jnp.inf]), jnp.array([1.0, 0.0])))
      0.0
    """
    log_q, t = _operands(where, log_predictions=log_predictions, targets=targets)
    return jnp.sum(xlogy(t, t) - xdiff(t, log_q, 0.0), axis=axis)


def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``kl_divergence_with_log_targets``: :math:`\sum_k e^{\log t_k} (\log t_k - \log q_k)`.

    Note:
      A :math:`-\infty` log-target contributes 0 with zero gradients (optax gives NaN).

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> print(losses.kl_divergence_with_log_targets(jnp.log(jnp.array([0.5, 0.5])),
      ...                                             jnp.array([0.0, -jnp.inf])))
      0.693147
    """
    log_q, log_t = _operands(where, log_predictions=log_predictions, log_targets=log_targets)
    return jnp.sum(xdiff(jnp.exp(log_t), log_t, log_q), axis=axis)


def generalized_kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``generalized_kl_divergence``: :func:`kl_divergence` plus :math:`\sum_k (q_k - t_k)`.

    The Bregman divergence of :math:`x \log x - x`, for unnormalised :math:`q` and :math:`t`.

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> print(losses.generalized_kl_divergence(jnp.log(jnp.array([1.0, 1.0])),
      ...                                        jnp.array([2.0, 0.0])))
      1.386294
    """
    log_q, t = _operands(where, log_predictions=log_predictions, targets=targets)
    q = (
        jnp.exp(log_q)
        if where is None
        else masked_fill(jnp.exp(log_q), jnp.asarray(where, bool), 0.0)
    )
    return kl_divergence(log_q, t, axis) + jnp.sum(q - t, axis=axis)


def convex_kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Deprecated alias of :func:`generalized_kl_divergence` (as in optax)."""
    warnings.warn(
        "convex_kl_divergence is deprecated: use generalized_kl_divergence",
        DeprecationWarning,
        stacklevel=2,
    )
    return generalized_kl_divergence(log_predictions, targets, axis=axis, where=where)


def sigmoid_binary_cross_entropy(logits: ArrayLike, labels: ArrayLike, **kwargs) -> jax.Array:
    r"""optax's ``sigmoid_binary_cross_entropy``, elementwise: :func:`jaxce.sigmoid_binary_cross_entropy`.

    Integer or bool labels are cast to the logits' dtype, as in optax; extra keywords
    (``where``, ``pos_weight``, ``label_smoothing``, ``reduction``, ...) go to jaxce.

    Note:
      Finite for :math:`\pm\infty` logits whose label allows them (optax gives NaN for
      :math:`z = +\infty, y = 1`). Returns float32 for bf16/f16 logits.

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> print(losses.sigmoid_binary_cross_entropy(jnp.array([0.0, jnp.inf]), jnp.array([1, 1])))
      [0.693147 0.      ]
    """
    logits = _floating(logits, "logits")
    return _sigmoid_binary_cross_entropy(logits, _like(labels, logits.dtype), **kwargs)


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
) -> jax.Array:
    r"""optax's ``sigmoid_focal_loss``: :math:`\alpha_t (1 - p_t)^\gamma` times the binary cross-entropy.

    .. math::
        \mathrm{FL} = \alpha_t (1 - p_t)^\gamma\, \mathrm{BCE}(z, y), \qquad
        \log(1 - p_t) = \log\big((1 - y)\, \sigma(z) + y\, \sigma(-z)\big)

    with :math:`\alpha_t = \alpha y + (1 - \alpha)(1 - y)` (1 without ``alpha``). The
    cross-entropy is :func:`jaxce.sigmoid_binary_cross_entropy`; the focal weight is computed
    in log space, as in optax.

    References:
      Lin et al., Focal Loss for Dense Object Detection, ICCV 2017.

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> print(losses.sigmoid_focal_loss(jnp.array([0.0]), jnp.array([1.0]), gamma=1.0))
      [0.346574]
    """
    logits = _floating(logits, "logits")
    dtype = compute_dtype(logits.dtype)
    z, y = jnp.broadcast_arrays(logits.astype(dtype), jnp.asarray(labels).astype(dtype))
    # p_t = 1 (an infinite logit on the label's side): the loss is 0, with gradient 0; there
    # log(1 - p_t) = -inf would give exp(0 * -inf) and 0 * inf (NaN), so such entries are
    # computed at z = 0 and zeroed (the double where).
    certain = ((z == jnp.inf) & (y == 1.0)) | ((z == -jnp.inf) & (y == 0.0))
    z = jnp.where(certain, 0.0, z)
    ce = _sigmoid_binary_cross_entropy(z, y)
    log_one_minus_pt = jax.scipy.special.logsumexp(
        jnp.stack([jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)], axis=-1),
        axis=-1,
        b=jnp.stack([1.0 - y, y], axis=-1),
    )
    loss = jnp.where(certain, 0.0, ce * jnp.exp(gamma * log_one_minus_pt))
    if alpha is None:
        return loss
    return (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss


def smooth_labels(
    labels: ArrayLike,
    alpha: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""optax's ``smooth_labels``: :math:`(1 - \alpha)\, y + \alpha / K`.

    :math:`K` is the number of classes over ``axis`` (``None``: every element), or the number
    of unmasked ones with ``where``. The jaxce losses also smooth internally
    (``label_smoothing=``), over the unmasked, possible classes.

    Examples:
      >>> import jax.numpy as jnp, jaxce.losses as losses
      >>> print(losses.smooth_labels(jnp.array([0.0, 1.0]), 0.1))
      [0.05 0.95]
    """
    labels = _floating(labels, "labels")
    if where is None:
        axes = canonical_axes(_class_axes(axis, labels.ndim), labels.ndim)
        num_classes = math.prod(labels.shape[a] for a in axes)
    else:
        num_classes = jnp.sum(jnp.asarray(where), axis=axis, keepdims=True)
    return (1.0 - alpha) * labels + alpha / num_classes
