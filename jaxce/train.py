r"""Softmax and logistic regression trained with jaxce's losses and Optax.

This is the project's demo and smoke test: ``python -m jaxce.train`` (or the ``jaxce-train``
console script) fits softmax regression to the bundled Iris data and checks that the test
accuracy clears a bar. The same functions are the Python API used by the tests and the
notebooks.

This module holds the command line; the Python API it re-exports lives in private modules
named after what they hold: ``jaxce._preprocessing`` (the stratified split and
standardisation), ``jaxce._regression`` (the models, their Hessian product and :func:`fit`)
and ``jaxce._report`` (the confusion matrix and the curves).

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
from collections.abc import Sequence

import numpy as np

from ._preprocessing import DEFAULT_TEST_FRACTION, split_stratified, standardize
from ._regression import (
    DEFAULT_LEARNING_RATES,
    DEFAULT_NEWTON_STEPS,
    DEFAULT_STEPS,
    DEFAULT_WEIGHT_DECAY,
    MAX_STEPS,
    MODELS,
    NEWTON_DAMPING,
    OPTIMIZERS,
    FitResult,
    History,
    fit,
    hessian_vector_product,
    init_params,
    predict,
    predict_proba,
)
from ._report import confusion_matrix, format_confusion_matrix, plot_curves
from .datasets import Dataset, load_csv, load_iris

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

#: Test accuracy the default run (softmax regression on Iris) must reach.
IRIS_ACCURACY_BAR = 0.93
#: The CLI lists at most this many class names and prints the confusion matrix only up to
#: this many classes; beyond, it gives the count and the first five names.
MAX_LISTED_CLASSES = 20
#: Seeds the CLI accepts are in ``[0, SEED_LIMIT)``: :func:`jax.random.key` keeps only the
#: low 32 bits of larger ones.
SEED_LIMIT = 2**32


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
