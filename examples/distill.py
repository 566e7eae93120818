"""Distil a teacher's softmax into a small student with jaxce: forward KL, JSD and top-k labels.

The data: 20 classes in 16 dimensions, in 5 groups of 4 confusable classes (each class's
centre is its group's centre plus a small offset). A teacher (an MLP, 256 hidden units) learns
from 20,000 labelled examples. The students (MLPs, 32 hidden units) have only 200 labels, and
an unlabelled transfer set of 8,000 examples:

- "hard labels": the student trained on its 200 labelled examples alone;
- "forward KL": ``jaxce.softmax_divergence(student, teacher, temperature=2)`` on the transfer
  set (KL(p_t || p_s): the classic distillation loss, mean-seeking);
- "JSD": the same with ``kind="jsd"`` (bounded, symmetric in spirit);
- "top-4 labels": the teacher's 4 most likely classes and their probabilities at the same
  temperature, cached once (as a large teacher's outputs are stored offline), through
  ``jaxce.softmax_cross_entropy_with_sparse_labels``: no dense [N, K] teacher output.

Each student trains with Adam for the same number of full-batch steps; the script prints the
test accuracies and losses and writes the test-accuracy curves to a PNG.

Run:  python examples/distill.py [--steps 300] [--out distill_curves.png]
"""

import argparse
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

CLASSES, GROUPS, DIM = 20, 5, 16
OFFSET, NOISE = 1.0, 1.5  # a class centre's offset from its group's, and the noise
TEMPERATURE = 2.0
TOP_K = 4


class Split(NamedTuple):
    x: jax.Array
    y: jax.Array


def make_data(seed=0, labelled=200, transfer=8000, teacher_examples=20000, test=5000):
    """Gaussian classes in groups of confusable neighbours; returns the splits."""
    rng = np.random.default_rng(seed)
    groups = 3.0 * rng.standard_normal((GROUPS, DIM))
    offsets = OFFSET * rng.standard_normal((CLASSES, DIM))
    centres = np.repeat(groups, CLASSES // GROUPS, axis=0) + offsets

    def sample(n):
        y = rng.integers(0, CLASSES, n)
        x = centres[y] + NOISE * rng.standard_normal((n, DIM))
        return Split(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32))

    return {
        "teacher": sample(teacher_examples),
        "labelled": sample(labelled),
        "transfer": sample(transfer),  # its labels are never used
        "test": sample(test),
    }


def init_mlp(key, hidden):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (DIM, hidden)) / np.sqrt(DIM),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, CLASSES)) / np.sqrt(hidden),
        "b2": jnp.zeros(CLASSES),
    }


def logits_of(params, x):
    return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def accuracy(params, split):
    return jnp.mean(jnp.argmax(logits_of(params, split.x), axis=-1) == split.y)


def train(loss_fn, params, steps, test, learning_rate=1e-2):
    """Full-batch Adam for ``steps`` steps, jit-compiled as one ``lax.scan``; returns the
    final parameters, the loss curve and the test-accuracy curve."""
    optimizer = optax.adam(learning_rate)

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), (loss, accuracy(params, test))

    (params, _), (losses, accuracies) = jax.jit(
        lambda p: jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps)
    )(params)
    return params, np.asarray(losses), np.asarray(accuracies)


def top_k_labels(teacher_logits, k, temperature):
    """The teacher's k most likely classes and their probabilities at ``temperature``,
    renormalised over the k: what a cache of a large teacher's outputs holds."""
    log_p = jax.nn.log_softmax(teacher_logits / temperature)
    top_log_p, indices = jax.lax.top_k(log_p, k)
    return indices, jax.nn.softmax(top_log_p)


def distil(data, steps, seed=0):
    """Train the teacher, then the four students; return {name: (losses, accuracies)}."""
    teacher_key, student_key = jax.random.split(jax.random.key(seed))
    teacher_set, labelled, transfer, test = (
        data[name] for name in ("teacher", "labelled", "transfer", "test")
    )

    def hard_loss(split):
        return lambda params: jaxce.softmax_cross_entropy_with_integer_labels(
            logits_of(params, split.x), split.y, reduction="mean"
        )

    teacher, _, teacher_curve = train(
        hard_loss(teacher_set), init_mlp(teacher_key, 256), steps, test
    )
    teacher_logits = jax.lax.stop_gradient(logits_of(teacher, transfer.x))
    indices, weights = top_k_labels(teacher_logits, TOP_K, TEMPERATURE)

    def divergence(kind):
        return lambda params: jaxce.softmax_divergence(
            logits_of(params, transfer.x), teacher_logits, kind=kind,
            temperature=TEMPERATURE, reduction="mean",
        )

    def sparse(params):
        return jaxce.softmax_cross_entropy_with_sparse_labels(
            logits_of(params, transfer.x) / TEMPERATURE, indices, weights, reduction="mean"
        )

    students = {
        "hard labels": hard_loss(labelled),
        "forward KL": divergence("forward_kl"),
        "JSD": divergence("jsd"),
        f"top-{TOP_K} labels": sparse,
    }
    start = init_mlp(student_key, 32)  # every student starts from the same weights
    curves = {"teacher": (None, teacher_curve)}
    for name, loss_fn in students.items():
        _, losses, accuracies = train(loss_fn, start, steps, test)
        curves[name] = (losses, accuracies)
    return curves


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (_, accuracies) in curves.items():
        style = "--" if name == "teacher" else "-"
        ax.plot(np.arange(1, len(accuracies) + 1), accuracies, style, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_title("Students with 200 labels: distilled from the teacher vs hard labels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per model (300)")
    parser.add_argument("--out", default="distill_curves.png", help="the PNG of the curves")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    curves = distil(make_data(args.seed), args.steps, args.seed)
    print(f"{'model':<14} {'final train loss':>17} {'test accuracy':>14}")
    for name, (losses, accuracies) in curves.items():
        loss = "" if losses is None else f"{losses[-1]:.4f}"
        print(f"{name:<14} {loss:>17} {accuracies[-1]:>14.3f}")
    plot(curves, args.out)
    print(f"curves written to {args.out}; {time.perf_counter() - started:.1f} s on "
          f"{jax.default_backend()}")
    return {name: float(accuracies[-1]) for name, (_, accuracies) in curves.items()}


if __name__ == "__main__":
    main()
