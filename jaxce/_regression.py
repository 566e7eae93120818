r"""Softmax and logistic regression, and their full-batch training with jaxce's losses and Optax.

Models, for features :math:`X \in \mathbb{R}^{n \times d}`:

.. math::

   \text{softmax:}\quad p = \operatorname{softmax}(X W + b),\ W \in \mathbb{R}^{d \times C},
   \qquad
   \text{logistic:}\quad p = \sigma(X w + b),\ w \in \mathbb{R}^{d},

trained on the mean cross-entropy (in nats) by an Optax first-order method or by Newton-CG
(see :func:`fit`). The whole update step runs under :func:`jax.jit`, many steps per call
with :func:`jax.lax.scan`; nothing here names a device, so the same code runs on CPU, GPU or
TPU.

JAX and Optax are imported inside the functions that use them, so that the command line of
:mod:`jaxce.train` parses (and ``--help`` answers) before they load.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import jax

MODELS = ("softmax", "logistic")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "lbfgs", "newton-cg")
#: Learning rate used when none is given; ``None`` lets L-BFGS's line search choose, and
#: Newton-CG takes the full Newton step.
DEFAULT_LEARNING_RATES = {
    "adam": 0.05, "adamw": 0.05, "sgd": 0.5, "rmsprop": 0.01, "lbfgs": None, "newton-cg": 1.0,
}  # fmt: skip
#: Weight decay used when none is given (0 for the optimizers not listed). L-BFGS drives the
#: unpenalised loss of separable classes (Iris's setosa) to 0 within its 500 default steps:
#: the weights grow past 2000 and the test loss past 20 nats. This small L2 penalty keeps a
#: finite minimum (weights' norm about 15, test loss 0.09 nats on Iris).
DEFAULT_WEIGHT_DECAY = {"lbfgs": 1e-4}
DEFAULT_STEPS = 500
#: Most steps :func:`fit` takes, so that its int32 step counter cannot wrap (a last chunk of
#: the default size runs past ``steps`` by less than ``steps``).
MAX_STEPS = 10**9
#: Steps used when none are given and the optimizer is Newton-CG (the problem is convex).
DEFAULT_NEWTON_STEPS = 10
#: Newton-CG: added to the Hessian's diagonal (softmax's W, b has a flat direction) ...
NEWTON_DAMPING = 1e-4
#: ... and the conjugate-gradient solve's relative tolerance and iteration cap.
NEWTON_CG_TOL, NEWTON_CG_MAXITER = 1e-5, 100

LossFn = Callable[["jax.Array", "jax.Array"], "jax.Array"]
Params = dict[str, "jax.Array"]


class History(NamedTuple):
    """What :func:`fit` recorded.

    Attributes:
      loss: ``[steps]`` mean training cross-entropy in nats, before each update.
      accuracy: ``[steps]`` training accuracy, before each update.
      eval_loss: ``[steps]`` the same on ``eval_set``, or ``None`` without one.
      eval_accuracy: ``[steps]`` the same on ``eval_set``, or ``None`` without one.
      final_loss: training cross-entropy after the last update.
      compile_seconds: time to trace and compile the scanned update.
      run_seconds: time spent running the compiled steps.
    """

    loss: np.ndarray
    accuracy: np.ndarray
    eval_loss: np.ndarray | None
    eval_accuracy: np.ndarray | None
    final_loss: float
    compile_seconds: float
    run_seconds: float


class FitResult(NamedTuple):
    """Trained parameters (``{"w": ..., "b": ...}``) and the training :class:`History`."""

    params: Params
    history: History


def init_params(num_features: int, num_classes: int, *, model: str = "softmax", seed: int = 0):
    """Small random weights and zero biases: ``w`` is ``[d, C]`` (softmax) or ``[d]``."""
    import jax
    import jax.numpy as jnp

    _check_model(model)
    shape = (num_features, num_classes) if model == "softmax" else (num_features,)
    w = 0.01 * jax.random.normal(jax.random.key(seed), shape, dtype=jnp.float32)
    return {"w": w, "b": jnp.zeros(shape[1:], dtype=jnp.float32)}


def _logits(params: Params, features: jax.Array) -> jax.Array:
    return features @ params["w"] + params["b"]


def _model_of(params: Params) -> str:
    return "softmax" if np.ndim(params["w"]) == 2 else "logistic"


def predict_proba(params: Params, features, model: str | None = None) -> jax.Array:
    """Class probabilities ``[n, C]``; for the logistic model the columns are (rest, positive).

    Args:
      params: from :func:`fit`.
      features: ``[n, d]``, scaled like the training features.
      model: ``"softmax"`` or ``"logistic"``; by default read off the shape of ``w``.
    """
    import jax
    import jax.numpy as jnp

    import jaxce

    model = model or _model_of(params)
    _check_model(model)
    if model != _model_of(params):
        raise ValueError(f"model={model!r}, but params are {_model_of(params)} regression's")
    logits = _logits(params, jnp.asarray(features, dtype=jnp.float32))
    if model == "softmax":
        return jaxce.softmax(logits, axis=-1)
    p = jax.nn.sigmoid(logits)
    return jnp.stack([jax.nn.sigmoid(-logits), p], axis=-1)


def predict(params: Params, features, model: str | None = None) -> np.ndarray:
    """Most probable class, ``[n]`` ``int32`` (for the logistic model 1 means positive)."""
    import jax.numpy as jnp

    return np.asarray(jnp.argmax(predict_proba(params, features, model), axis=-1), np.int32)


def _default_loss(model: str) -> LossFn:
    import jaxce

    if model == "softmax":
        return lambda logits, labels: jaxce.softmax_cross_entropy_with_integer_labels(
            logits, labels, reduction="mean"
        )
    return lambda logits, labels: jaxce.sigmoid_binary_cross_entropy(
        logits, labels, reduction="mean"
    )


def _accuracy(logits: jax.Array, labels: jax.Array, model: str) -> jax.Array:
    import jax.numpy as jnp

    predicted = jnp.argmax(logits, axis=-1) if model == "softmax" else (logits > 0)
    return jnp.mean(predicted == labels)


def hessian_vector_product(
    params: Params, features: jax.Array, l2: float = 0.0, damping: float = 0.0
) -> Callable[[Params], Params]:
    r"""The product with the Hessian of the mean cross-entropy in the parameters.

    For logits :math:`Z = X W + b` and a direction :math:`V = (V_W, V_b)`, the chain rule
    (the logits are linear in the parameters, so Gauss-Newton is the exact Hessian) gives

    .. math::

       H V = \bigl(X^\top R,\ \textstyle\sum_i R_i\bigr),
       \qquad R = \tfrac{1}{n}\,\bigl(\operatorname{diag}(p) - p p^\top\bigr)(X V_W + V_b)
       \ \text{per row},

    with the logits' product from :func:`jaxce.softmax_cross_entropy_hvp`: no ``[C, C]`` or
    parameter-sized Hessian is formed. The logistic model's :math:`\sigma(1 - \sigma)` is the
    same product for the two-class logits :math:`(0, z)`. ``l2`` adds :math:`\lambda V_W` (the
    penalty :math:`\tfrac{\lambda}{2}\lVert W \rVert^2`) and ``damping`` adds
    :math:`\delta V`. The labels do not enter: the Hessian does not depend on them.

    Args:
      params: the point, ``{"w": ..., "b": ...}`` from :func:`init_params` or :func:`fit`.
      features: ``[n, d]`` float32 features.
      l2: weight of the L2 penalty on ``w``.
      damping: added to the whole diagonal.

    Returns:
      A function of a params-shaped direction ``V`` returning :math:`(H + \dots) V`.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0], [-1.0]])
      >>> hvp = hessian_vector_product({"w": jnp.zeros((1, 2)), "b": jnp.zeros(2)}, x)
      >>> print(hvp({"w": jnp.array([[1.0, 0.0]]), "b": jnp.zeros(2)})["w"])
      [[ 0.25 -0.25]]
    """
    import jax.numpy as jnp

    import jaxce

    logits = _logits(params, features)
    model = _model_of(params)

    def logits_hvp(u):
        if model == "softmax":
            return jaxce.softmax_cross_entropy_hvp(logits, u)
        pad = lambda z: jnp.stack([jnp.zeros_like(z), z], axis=-1)
        return jaxce.softmax_cross_entropy_hvp(pad(logits), pad(u))[..., 1]

    def hvp(v: Params) -> Params:
        r = logits_hvp(_logits(v, features)) / features.shape[0]
        return {
            "w": features.T @ r + (l2 + damping) * v["w"],
            "b": jnp.sum(r, axis=0) + damping * v["b"],
        }

    return hvp


def _newton_direction(params: Params, grads: Params, features: jax.Array, l2: float) -> Params:
    """Solves ``(H + l2 + damping) d = -g`` by conjugate gradients (Hessian products only)."""
    import jax
    import jax.numpy as jnp

    hvp = hessian_vector_product(params, features, l2, NEWTON_DAMPING)
    minus_g = jax.tree.map(jnp.negative, grads)
    direction, _ = jax.scipy.sparse.linalg.cg(
        hvp, minus_g, tol=NEWTON_CG_TOL, maxiter=NEWTON_CG_MAXITER
    )
    return direction


def _optimizer(name: str, learning_rate: float | None, weight_decay: float):
    import optax

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    if name == "lbfgs":
        return optax.lbfgs(learning_rate=learning_rate)
    if learning_rate is None:
        raise ValueError(f"optimizer {name!r} needs a learning rate")
    if name == "newton-cg":  # scales the Newton direction, which fit computes
        return optax.scale(learning_rate)
    if name == "adamw":  # decoupled decay of the weights (not the biases)
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask={"w": True, "b": False})
    return {"adam": optax.adam, "sgd": optax.sgd, "rmsprop": optax.rmsprop}[name](learning_rate)


def _check_hyperparameters(learning_rate, weight_decay, chunk_size) -> None:
    """A learning rate finite and > 0 (or None, for L-BFGS's line search), a weight decay
    finite and >= 0, and a chunk size that is a positive int (or None)."""
    if learning_rate is not None and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be finite and > 0, got {learning_rate!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _check_labels(labels: np.ndarray, model: str) -> None:
    """Integer class ids, ``0 .. C-1`` (softmax) or ``0``/``1`` (logistic): a float label is
    not truncated, a negative one not turned into NaN losses."""
    if labels.dtype.kind not in "iub":
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    allowed = "0 .. C-1" if model == "softmax" else "0 or 1"
    bad = (labels < 0) if model == "softmax" else (labels != 0) & (labels != 1)
    if np.any(bad):
        got = labels[bad].flat[0]
        raise ValueError(f"labels must be {allowed} for {model} regression, got {got}")


def fit(
    features,
    labels,
    *,
    model: str = "softmax",
    steps: int | None = None,
    learning_rate: float | None = None,
    optimizer: str = "adam",
    weight_decay: float | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    eval_set: tuple | None = None,
    chunk_size: int | None = None,
    callback: Callable[[int, float, float], None] | None = None,
) -> FitResult:
    r"""Full-batch training of softmax or logistic regression.

    Each step evaluates the loss and its gradient on all rows and applies one Optax update.
    With ``optimizer="newton-cg"`` the update is instead ``learning_rate`` times the Newton
    step :math:`d` solving :math:`(H + \lambda + \delta) d = -g` by conjugate gradients
    (:func:`jax.scipy.sparse.linalg.cg`) on products from :func:`hessian_vector_product`
    (the Hessian of the mean cross-entropy, exact for these linear models; a custom
    ``loss_fn`` changes the gradient but not this Hessian), :math:`\lambda` the
    ``weight_decay`` (on ``w`` only) and :math:`\delta` = ``NEWTON_DAMPING``. The objective
    is convex, so a handful of full steps converges. The step is jit-compiled and run
    ``chunk_size`` times per call with :func:`jax.lax.scan`; between calls ``callback``
    reports progress.

    Args:
      features: ``[n, d]`` floats (standardise them first, see :func:`standardize`).
      labels: ``[n]`` integers; ``0 .. C-1`` for softmax, ``0``/``1`` for logistic.
      model: ``"softmax"`` (``C`` = ``labels.max() + 1`` classes) or ``"logistic"``.
      steps: number of updates, at most ``MAX_STEPS``; ``None`` means ``DEFAULT_STEPS``,
        or ``DEFAULT_NEWTON_STEPS`` for Newton-CG.
      learning_rate: step size; ``None`` takes ``DEFAULT_LEARNING_RATES[optimizer]``.
      optimizer: one of ``adam``, ``adamw``, ``sgd``, ``rmsprop``, ``lbfgs``,
        ``newton-cg``.
      weight_decay: for ``adamw`` decoupled decay of ``w``; otherwise the objective gets
        :math:`\tfrac{\lambda}{2}\lVert w \rVert^2` (the recorded loss stays the bare
        cross-entropy). ``None`` takes ``DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0)``.
      seed: seeds the initial weights.
      loss_fn: ``loss_fn(logits, labels) -> scalar`` mean loss; defaults to
        :func:`jaxce.softmax_cross_entropy_with_integer_labels` (softmax) or
        :func:`jaxce.sigmoid_binary_cross_entropy` (logistic, labels as ``float32``), both
        with ``reduction="mean"``. A test swaps in optax's losses here.
      eval_set: optional ``(features, labels)`` scored at every step as well.
      chunk_size: steps per scan call; default ``ceil(steps / 20)``.
      callback: called after each chunk as ``callback(step, loss, accuracy)``, with the
        number of steps done and the training loss and accuracy of the last of them.

    Returns:
      :class:`FitResult` with the final parameters and the :class:`History`.

    Examples:
      >>> x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
      >>> result = fit(x, np.array([0, 0, 1, 1]), steps=50)
      >>> predict(result.params, x).tolist(), float(result.history.accuracy[-1])
      ([0, 0, 1, 1], 1.0)
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax

    _check_model(model)
    if steps is None:
        steps = DEFAULT_NEWTON_STEPS if optimizer == "newton-cg" else DEFAULT_STEPS
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATES.get(optimizer)
    if weight_decay is None:
        weight_decay = DEFAULT_WEIGHT_DECAY.get(optimizer, 0.0)
    _check_hyperparameters(learning_rate, weight_decay, chunk_size)
    opt = _optimizer(optimizer, learning_rate, weight_decay)
    loss_fn = loss_fn or _default_loss(model)
    label_dtype = jnp.int32 if model == "softmax" else jnp.float32
    x = jnp.asarray(features, dtype=jnp.float32)
    y = jnp.asarray(np.asarray(labels), dtype=label_dtype)
    if x.ndim != 2 or y.shape != x.shape[:1]:
        raise ValueError(f"features shape {x.shape} and labels shape {y.shape} do not match")
    _check_labels(np.asarray(labels), model)
    num_classes = int(np.max(labels)) + 1 if model == "softmax" else 1
    if model == "softmax" and num_classes < 2:
        raise ValueError("softmax regression needs at least two classes")
    data = (x, y)
    if eval_set is not None:
        data += (
            jnp.asarray(eval_set[0], dtype=jnp.float32),
            jnp.asarray(np.asarray(eval_set[1]), dtype=label_dtype),
        )
    penalty = weight_decay if optimizer != "adamw" else 0.0

    def objective(params, x, y):
        logits = _logits(params, x)
        loss = loss_fn(logits, y)
        return loss + 0.5 * penalty * jnp.sum(params["w"] ** 2), (loss, logits)

    def step(carry, data):
        params, opt_state, i = carry
        x, y = data[:2]
        (value, (loss, logits)), grads = jax.value_and_grad(objective, has_aux=True)(params, x, y)
        record = [loss, _accuracy(logits, y, model)]
        if eval_set is not None:
            eval_logits = _logits(params, data[2])
            record += [loss_fn(eval_logits, data[3]), _accuracy(eval_logits, data[3], model)]
        if optimizer == "lbfgs":
            updates, new_state = opt.update(
                grads, opt_state, params, value=value, grad=grads,
                value_fn=lambda p: objective(p, x, y)[0],
            )  # fmt: skip
        elif optimizer == "newton-cg":
            direction = _newton_direction(params, grads, x, penalty)
            updates, new_state = opt.update(direction, opt_state, params)
        else:
            updates, new_state = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # The last chunk may overrun `steps`: those steps leave the state untouched.
        keep = lambda new, old: jnp.where(i < steps, new, old)
        params, opt_state = jax.tree.map(keep, (new_params, new_state), (params, opt_state))
        return (params, opt_state, i + 1), record

    chunk = chunk_size or -(-steps // 20)

    def run_chunk(carry, data):
        return lax.scan(lambda c, _: step(c, data), carry, length=chunk)

    params = init_params(x.shape[1], num_classes, model=model, seed=seed)
    carry = (params, opt.init(params), jnp.zeros((), jnp.int32))
    start = time.perf_counter()
    compiled = jax.jit(run_chunk).lower(carry, data).compile()
    compile_seconds = time.perf_counter() - start

    records = []
    start = time.perf_counter()
    for done in range(chunk, steps + chunk, chunk):
        carry, record = compiled(carry, data)
        records.append(record)
        if callback is not None:
            callback(min(done, steps), float(record[0][-1]), float(record[1][-1]))
    jax.block_until_ready(carry)
    run_seconds = time.perf_counter() - start

    columns = [np.concatenate(c)[:steps] for c in zip(*records, strict=True)]
    columns += [None] * (4 - len(columns))  # no eval_set
    params = carry[0]
    final_loss = float(loss_fn(_logits(params, x), y))
    history = History(*columns, final_loss, compile_seconds, run_seconds)
    return FitResult(params, history)


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
