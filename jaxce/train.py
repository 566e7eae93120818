r"""Softmax and logistic regression trained with jaxce's losses and Optax.

This is the project's demo and smoke test: ``python -m jaxce.train`` (or the ``jaxce-train``
console script) fits softmax regression to the bundled Iris data and checks that the test
accuracy clears a bar. The same functions are the Python API used by the tests and the
notebooks.

Models, for features :math:`X \in \mathbb{R}^{n \times d}`:

.. math::

   \text{softmax:}\quad p = \operatorname{softmax}(X W + b),\ W \in \mathbb{R}^{d \times C},
   \qquad
   \text{logistic:}\quad p = \sigma(X w + b),\ w \in \mathbb{R}^{d},

trained on the mean cross-entropy (in nats) by an Optax first-order method or by Newton-CG
(see :func:`fit`). The whole update step runs under
:func:`jax.jit`, many steps per call with :func:`jax.lax.scan`; nothing here names a device,
so the same code runs on CPU, GPU or TPU.

matplotlib and tqdm are optional (``pip install -e ".[demo]"`` from the checkout) and
imported only inside the functions that draw curves or progress bars. JAX and Optax are
imported inside the functions that use them, so the command line parses (and ``--help``
answers) before they load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from jaxce.datasets import Dataset, load_csv, load_iris

if TYPE_CHECKING:
    import jax

__all__ = [
    "FitResult",
    "History",
    "confusion_matrix",
    "fit",
    "format_confusion_matrix",
    "hessian_vector_product",
    "init_params",
    "main",
    "plot_curves",
    "predict",
    "predict_proba",
    "split_stratified",
    "standardize",
]

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
DEFAULT_TEST_FRACTION = 0.3
#: Test accuracy the default run (softmax regression on Iris) must reach.
IRIS_ACCURACY_BAR = 0.93
#: The CLI lists at most this many class names and prints the confusion matrix only up to
#: this many classes; beyond, it gives the count and the first five names.
MAX_LISTED_CLASSES = 20
#: Seeds the CLI accepts are in ``[0, SEED_LIMIT)``: :func:`jax.random.key` keeps only the
#: low 32 bits of larger ones.
SEED_LIMIT = 2**32

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


# ----------------------------------------------------------------------------- data helpers


def split_stratified(
    labels: np.ndarray, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train/test split that keeps each class's share.

    Each class contributes ``round(test_fraction * count)`` shuffled rows to the test set,
    leaving at least one in the training set.

    Args:
      labels: ``[n]`` integer labels.
      test_fraction: share of each class held out, in (0, 1).
      seed: seed of the NumPy generator that shuffles.

    Returns:
      ``(train_index, test_index)``, sorted ``int64`` arrays partitioning ``range(n)``.

    Examples:
      >>> train, test = split_stratified(np.array([0, 0, 0, 0, 1, 1, 1, 1]), test_fraction=0.5)
      >>> len(train), len(test)
      (4, 4)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(round(test_fraction * len(rows)), len(rows) - 1)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    test_index = np.sort(np.concatenate(test))
    if test_index.size == 0:
        raise ValueError(
            f"test fraction {test_fraction} leaves no test rows out of {labels.size}; raise it"
        )
    return np.sort(np.concatenate(train)), test_index


def standardize(
    features: np.ndarray, *, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale each column to zero mean and unit variance.

    Pass the ``mean`` and ``std`` returned for the training rows when scaling test rows, so
    no test statistic leaks into training. Constant columns get ``std = 1``. The arithmetic
    is in float64, so features near float32's limit (``3e38``) do not overflow; rows far
    outside the statistics' rows can still scale beyond float32 and come back as ``inf``.

    Returns:
      ``(scaled, mean, std)``, all ``float32``.

    Examples:
      >>> z, mean, std = standardize(np.array([[1.0, 5.0], [3.0, 5.0]]))
      >>> z.tolist(), mean.tolist(), std.tolist()
      ([[-1.0, 0.0], [1.0, 0.0]], [2.0, 5.0], [1.0, 1.0])
    """
    x = np.asarray(features, dtype=np.float64)
    mean = np.asarray(x.mean(axis=0) if mean is None else mean, np.float32)
    if std is None:
        std = np.asarray(x.std(axis=0), np.float32)
        std = np.where(std > 0, std, np.float32(1.0))
    std = np.asarray(std, np.float32)
    with np.errstate(over="ignore"):  # the inf the docstring promises
        return ((x - mean) / std).astype(np.float32), mean, std


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``[C, C]`` counts: row = true class, column = predicted class.

    Examples:
      >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
      [[1, 0], [1, 1]]
    """
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts


def format_confusion_matrix(counts: np.ndarray, class_names: Sequence[str]) -> str:
    """The confusion matrix as a text table with class names (rows true, columns predicted)."""
    width = max(len(name) for name in class_names)
    cell = max(width, 5)
    lines = [" " * (width + 2) + "".join(f" {name:>{cell}}" for name in class_names)]
    for name, row in zip(class_names, counts, strict=True):
        lines.append(f"  {name:<{width}}" + "".join(f" {n:>{cell}d}" for n in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- model


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
        pad = lambda z: jnp.stack([jnp.zeros_like(z), z], axis=-1)  # noqa: E731
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
    opt = _optimizer(optimizer, learning_rate, weight_decay)
    loss_fn = loss_fn or _default_loss(model)
    label_dtype = jnp.int32 if model == "softmax" else jnp.float32
    x = jnp.asarray(features, dtype=jnp.float32)
    y = jnp.asarray(np.asarray(labels), dtype=label_dtype)
    if x.ndim != 2 or y.shape != x.shape[:1]:
        raise ValueError(f"features shape {x.shape} and labels shape {y.shape} do not match")
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
        keep = lambda new, old: jnp.where(i < steps, new, old)  # noqa: E731
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


# ----------------------------------------------------------------------------------- plots


def plot_curves(history: History, axes=None):
    """Loss (nats) and accuracy against step, on two matplotlib axes.

    Args:
      history: from :func:`fit`.
      axes: two axes to draw on; by default a new ``Figure`` (no pyplot, no global state).

    Returns:
      The figure holding the axes.
    """
    if axes is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.5), layout="constrained")
        axes = fig.subplots(1, 2)
    loss_ax, acc_ax = axes
    steps = np.arange(1, len(history.loss) + 1)
    loss_ax.plot(steps, history.loss, label="train")
    acc_ax.plot(steps, history.accuracy, label="train")
    if history.eval_loss is not None:
        loss_ax.plot(steps, history.eval_loss, label="test")
        acc_ax.plot(steps, history.eval_accuracy, label="test")
    loss_ax.set(xlabel="step", ylabel="cross-entropy (nats)", yscale="log", title="loss")
    acc_ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    for ax in axes:
        ax.legend()
    return loss_ax.figure


# ------------------------------------------------------------------------------------- CLI


class _UsageError(ValueError):
    """Bad command-line input: reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    rates = ", ".join(
        f"{'line search' if rate is None else f'{rate:g}'} for {name}"
        for name, rate in DEFAULT_LEARNING_RATES.items()
    )
    decays = ", ".join(f"{decay:g} for {name}" for name, decay in DEFAULT_WEIGHT_DECAY.items())
    p = _Parser(
        prog="jaxce-train",
        description="Train softmax (multi-class) or logistic (binary) regression with "
        "jaxce's cross-entropy and Optax. Default: softmax regression on the bundled Iris data.",
    )
    p.add_argument(
        "--model", choices=MODELS, default="softmax",
        help="softmax: one class among all; logistic: one class against the rest "
        "(default: softmax)",
    )  # fmt: skip
    p.add_argument(
        "--positive-class", metavar="NAME",
        help="logistic model: the class scored against the rest (default: the last class "
        "in sorted order, virginica for Iris)",
    )  # fmt: skip
    p.add_argument(
        "--steps", type=int,
        help=f"updates to make (default: {DEFAULT_STEPS}, or {DEFAULT_NEWTON_STEPS} for "
        "--optimizer newton-cg)",
    )  # fmt: skip
    p.add_argument("--learning-rate", type=float, help=f"step size (default: {rates})")
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adam",
        help="an Optax first-order method, L-BFGS with line search, or Newton-CG (Hessian "
        "products by conjugate gradients) (default: adam)",
    )  # fmt: skip
    p.add_argument(
        "--weight-decay", type=float,
        help=f"L2 penalty on the weights, decoupled for adamw (default: {decays}, 0 otherwise)",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the split and the weights (default: 0)"
    )  # fmt: skip
    p.add_argument(
        "--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
        help=f"share of each class held out for testing (default: {DEFAULT_TEST_FRACTION})",
    )  # fmt: skip
    p.add_argument(
        "--csv", metavar="PATH",
        help="train on this CSV file (comma, semicolon or tab separated, with a header line) "
        "instead of Iris; needs --target (default: the bundled Iris data)",
    )  # fmt: skip
    p.add_argument("--target", metavar="COLUMN", help="label column of --csv (default: none)")
    columns = p.add_mutually_exclusive_group()
    columns.add_argument(
        "--features", metavar="A,B,...", type=_column_names,
        help="--csv: the feature columns, in order (default: every column but --target)",
    )  # fmt: skip
    columns.add_argument(
        "--drop", metavar="A,B,...", type=_column_names,
        help="--csv: columns that are not features, such as an ID (default: none)",
    )  # fmt: skip
    p.add_argument(
        "--out", metavar="DIR",
        help="write metrics.json, params.npz and curves.png to this directory, created if "
        "needed (default: write nothing)",
    )  # fmt: skip
    p.add_argument(
        "--min-accuracy", type=float,
        help=f"exit with status 1 below this test accuracy (default: {IRIS_ACCURACY_BAR} for "
        "softmax on Iris, none otherwise)",
    )  # fmt: skip
    p.add_argument(
        "--no-progress", action="store_true",
        help="no progress bar or progress lines on stderr (default: show them)",
    )  # fmt: skip
    return p


def _column_names(text: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]``: the value of ``--features`` and ``--drop``."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty column name in {text!r}")
    return names


def _check_args(args) -> None:
    if args.steps is None:
        newton = args.optimizer == "newton-cg"
        args.steps = DEFAULT_NEWTON_STEPS if newton else DEFAULT_STEPS
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY.get(args.optimizer, 0.0)
    if args.steps < 1:
        raise _UsageError(f"--steps must be positive, got {args.steps}")
    if args.steps > MAX_STEPS:
        raise _UsageError(
            f"--steps must be at most {MAX_STEPS} (an int32 counts them), got {args.steps}"
        )
    if not 0 <= args.seed < SEED_LIMIT:
        raise _UsageError(f"--seed must be in [0, {SEED_LIMIT}), got {args.seed}")
    if not 0.0 < args.test_fraction < 1.0:
        raise _UsageError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if args.learning_rate is not None and not 0 < args.learning_rate < math.inf:
        raise _UsageError(f"--learning-rate must be positive and finite, got {args.learning_rate}")
    if not 0 <= args.weight_decay < math.inf:
        raise _UsageError(f"--weight-decay must be >= 0 and finite, got {args.weight_decay}")
    if args.min_accuracy is not None and not 0 <= args.min_accuracy <= 1:
        raise _UsageError(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    if (args.csv is None) != (args.target is None):
        raise _UsageError("--csv PATH and --target COLUMN go together")
    if args.csv is None and (args.features or args.drop):
        raise _UsageError("--features and --drop apply only to --csv")
    if args.positive_class is not None and args.model != "logistic":
        raise _UsageError("--positive-class applies only to --model logistic")


def _make_out_dir(out: str) -> None:
    """Creates ``--out`` before any work, so a bad path fails at once, not after training."""
    try:
        os.makedirs(out, exist_ok=True)
    except FileExistsError:
        raise _UsageError(f"--out {out}: exists and is not a directory") from None
    except OSError as e:
        raise _UsageError(f"--out {out}: {e.strerror}") from None


class _Progress:
    """tqdm bar on stderr if tqdm is installed, else a plain line per chunk.

    The bar is opened at the first report, after compilation, so its rate counts steps only.
    """

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.bar = total, enabled, 0, None

    def __call__(self, step: int, loss: float, accuracy: float) -> None:
        if not self.enabled:
            return
        if self.done == 0:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(
                    total=self.total, desc="training", file=sys.stderr,
                    # No rate: per-chunk syncs skew it; the report gives the real steps/s.
                    bar_format="{desc} {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt}{postfix}",
                )  # fmt: skip
        text = f"loss {loss:.4f} nats = {loss / math.log(2):.4f} bits, accuracy {accuracy:.3f}"
        if self.bar is None:
            print(f"step {step:>{len(str(self.total))}}/{self.total}: {text}", file=sys.stderr)
        else:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.done)
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    """Train and report as ``main`` does, from parsed arguments; returns the exit status."""
    _check_args(args)
    if args.out is not None:
        _make_out_dir(args.out)
    import jax

    if args.csv is None:
        data, source = load_iris(), "Iris (bundled)"
    else:
        try:
            data = load_csv(args.csv, args.target, features=args.features, drop=args.drop or ())
            source = args.csv
        except ValueError as e:
            raise _UsageError(str(e)) from None
        _check_classes(data, args.target)
    class_names = data.class_names
    labels = data.labels
    if args.model == "logistic":
        positive = args.positive_class or class_names[-1]
        if positive not in class_names:
            raise _UsageError(
                f"unknown positive class {positive!r}; classes: {_name_list(class_names)}"
            )
        labels = (labels == class_names.index(positive)).astype(np.int32)
        class_names = (f"not {positive}", positive)
    # Split on the original classes, so every model sees the same rows.
    try:
        train, test = split_stratified(
            data.labels, test_fraction=args.test_fraction, seed=args.seed
        )
    except ValueError as e:
        raise _UsageError(str(e)) from None
    x_train, mean, std = standardize(data.features[train])
    x_test, _, _ = standardize(data.features[test], mean=mean, std=std)
    _check_scaled(x_test, test, data.feature_names, mean, std)
    y_train, y_test = labels[train], labels[test]

    learning_rate = args.learning_rate or DEFAULT_LEARNING_RATES[args.optimizer]
    kind = "softmax regression" if args.model == "softmax" else "logistic regression"
    print(f"{kind} on {source}: {len(labels)} rows, {data.features.shape[1]} features, "
          f"classes {_name_list(class_names)}")  # fmt: skip
    print(f"split {len(train)} train / {len(test)} test (stratified, seed {args.seed}); "
          "features standardised with train statistics")  # fmt: skip
    lr_text = "line search" if learning_rate is None else f"learning rate {learning_rate:g}"
    if args.optimizer == "newton-cg":
        lr_text = f"step scale {learning_rate:g}, damping {NEWTON_DAMPING:g}"
    print(f"{args.optimizer}, {lr_text}, weight decay {args.weight_decay:g}, {args.steps} steps")
    sys.stdout.flush()

    progress = _Progress(args.steps, enabled=not args.no_progress)
    try:
        params, history = fit(
            x_train, y_train, model=args.model, steps=args.steps, learning_rate=learning_rate,
            optimizer=args.optimizer, weight_decay=args.weight_decay, seed=args.seed,
            eval_set=(x_test, y_test), callback=progress,
        )  # fmt: skip
    finally:
        progress.close()
    if not math.isfinite(history.final_loss):
        raise _UsageError(
            f"training diverged to a final loss of {history.final_loss}; "
            "lower --learning-rate or --weight-decay"
        )

    train_accuracy = float(np.mean(predict(params, x_train) == y_train))
    test_accuracy = float(np.mean(predict(params, x_test) == y_test))
    counts = confusion_matrix(y_test, predict(params, x_test), len(class_names))
    steps_per_second = args.steps / history.run_seconds
    device = jax.devices()[0]
    bar = args.min_accuracy
    if bar is None and args.csv is None and args.model == "softmax":
        bar = IRIS_ACCURACY_BAR

    loss = history.final_loss
    print(f"train accuracy {train_accuracy:.3f}, test accuracy {test_accuracy:.3f}")
    print(f"final train loss {loss:.4f} nats = {loss / math.log(2):.4f} bits")
    if len(class_names) <= MAX_LISTED_CLASSES:
        print("confusion matrix on the test split (rows: true class, columns: predicted):")
        print(format_confusion_matrix(counts, class_names))
    else:
        where = "--out DIR writes it" if args.out is None else "it is written"
        print(f"confusion matrix on the test split: {len(class_names)} x {len(class_names)}, "
              f"too large to print; {where} to metrics.json")  # fmt: skip
    print(f"{steps_per_second:,.0f} steps/s ({args.steps} steps in {history.run_seconds:.3f} s, "
          f"compile {history.compile_seconds:.2f} s)")  # fmt: skip
    print(f"JAX backend {jax.default_backend()}, device {device} ({device.device_kind})")

    metrics = {
        "model": args.model,
        "data": source,
        "class_names": list(class_names),
        "feature_names": list(data.feature_names),
        "optimizer": args.optimizer,
        "learning_rate": learning_rate,
        "weight_decay": args.weight_decay,
        "steps": args.steps,
        "seed": args.seed,
        "test_fraction": args.test_fraction,
        "n_train": len(train),
        "n_test": len(test),
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "final_loss_nats": loss,
        "final_loss_bits": loss / math.log(2),
        "confusion_matrix": counts.tolist(),
        "steps_per_second": steps_per_second,
        "compile_seconds": history.compile_seconds,
        "backend": jax.default_backend(),
        "device": str(device),
        "accuracy_bar": bar,
        "history": {k: np.asarray(getattr(history, k)).tolist()
                    for k in ("loss", "accuracy", "eval_loss", "eval_accuracy")},
    }  # fmt: skip
    if args.out is not None:
        _write_outputs(args.out, metrics, params, mean, std, history)

    if bar is None:
        return 0
    ok = test_accuracy >= bar
    verdict = f">= {bar}: OK" if ok else f"< {bar}: FAIL"
    print(f"test accuracy {test_accuracy:.3f} {verdict}")
    return 0 if ok else 1


def _name_list(names: Sequence[str]) -> str:
    """The names joined by commas; beyond ``MAX_LISTED_CLASSES``, the first few and the count.

    Examples:
      >>> _name_list([f"c{k}" for k in range(300)])
      'c0, c1, c2, c3, c4, ... (300 in all)'
    """
    if len(names) <= MAX_LISTED_CLASSES:
        return ", ".join(names)
    return f"{', '.join(names[:5])}, ... ({len(names)} in all)"


def _check_classes(data: Dataset, target: str) -> None:
    """Each class needs two rows, one per side of the split; a continuous target has one."""
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    single = [name for name, n in zip(data.class_names, counts, strict=True) if n == 1]
    if single:
        raise _UsageError(
            f"target {target!r} has {len(counts)} distinct values in {data.labels.size} rows, "
            f"{len(single)} of them in one row only ({_name_list(single)}); "
            "a class needs two rows, one to train on and one to test"
        )


def _check_scaled(scaled: np.ndarray, rows: np.ndarray, feature_names, mean, std) -> None:
    """A row scaled with statistics it did not enter can overflow float32: name the first."""
    bad = np.argwhere(~np.isfinite(scaled))
    if bad.size:
        i, j = bad[0]
        raise _UsageError(
            f"column {feature_names[j]!r} row {rows[i] + 1}: standardised with the training "
            f"rows' mean {mean[j]:.3g} and std {std[j]:.3g} it overflows float32"
        )


def _write_outputs(out, metrics, params, mean, std, history) -> None:
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    np.savez(
        os.path.join(out, "params.npz"),
        w=np.asarray(params["w"]), b=np.asarray(params["b"]), mean=mean, std=std,
        class_names=np.array(metrics["class_names"]),
        feature_names=np.array(metrics["feature_names"]),
    )  # fmt: skip
    written = ["metrics.json", "params.npz"]
    try:
        fig = plot_curves(history)
    except ImportError:
        print(
            'matplotlib not installed: no curves.png (pip install -e ".[demo]" from the checkout)'
        )
    else:
        fig.savefig(os.path.join(out, "curves.png"), dpi=100)
        written.append("curves.png")
    print(f"wrote {', '.join(written)} to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``jaxce-train``, ``python -m jaxce.train``).

    Bad input (missing file or column, duplicate column names, a missing value, features not
    finite in float32, a single class or a class with a single row, unknown positive class,
    an ``--out`` that is not a directory, a flag out of range, training that diverges, ...)
    prints one line on stderr and returns 2; ``--out`` is checked before any work.
    """
    try:
        return run(_parser().parse_args(argv))
    except _UsageError as e:  # other exceptions are bugs: let them show their traceback
        print(f"jaxce-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
