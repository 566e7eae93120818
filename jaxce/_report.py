"""What the training demo reports: the confusion matrix, as counts and as a text table,
and the loss and accuracy curves.

matplotlib is optional and imported only inside :func:`plot_curves`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._regression import History


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
