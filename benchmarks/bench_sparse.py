"""Benchmark sparse labels (issue 13): ``softmax_cross_entropy_with_sparse_labels`` against
``softmax_cross_entropy`` on the dense labels they stand for, side by side in one run.

Each row compiles ``jax.jit(jax.value_and_grad(mean loss))`` (gradient in the logits) for both
and reports the median wall time of one call, measured in alternating *pairs*
(``benchmarks/_timing.py``: ``ratio`` is the median of the per-pair ratios A/B, ``spread`` their
10-90% range), and ``temp_size_in_bytes`` of the compiled functions (scratch besides the
arguments and outputs).

Rows, N=4096 examples, V=32768 classes, float32:

- sparse k=32 (a teacher's top-32 probabilities, renormalised) vs the soft-label loss on their
  scatter into [N, V] dense labels (built once, outside the timing): target time <= 0.5x and
  no [N, V] temporary (temp within ``ROW_SLACK`` of eight [N, k] float32 arrays). The time
  target is not met on XLA:CPU (about 0.7x): sparse labels cost what integer labels do (the
  second row), two passes that exponentiate every logit and the gradient's write, and the
  dense loss adds only its max pass and the reads of its labels to those;
- sparse k=1 with weight 1 vs the integer-label loss on the same classes (the same numbers):
  for information, the cost of the general path over the integer fast path.

Usage::

    python benchmarks/bench_sparse.py            # N=4096, V=32768, k=32 (a minute or two)
    python benchmarks/bench_sparse.py --quick    # N=256: a smoke run
"""

import argparse
import shlex
import statistics
import sys

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
from _timing import machine, paired_times  # benchmarks/_timing.py (the script's folder)

import jaxce

MIB = 2**20
ROW_SLACK = MIB  # O(N) row vectors, not [N, V] scratch


def make_inputs(n, v, k, seed=0):
    """Logits, and the top-k of a teacher's softmax as sparse labels (weights sum to 1)."""
    kz, kt = jax.random.split(jax.random.key(seed))
    z = 3.0 * jax.random.normal(kz, (n, v), jnp.float32)
    teacher = 3.0 * jax.random.normal(kt, (n, v), jnp.float32)
    top, indices = jax.lax.top_k(jax.nn.softmax(teacher, axis=-1), k)
    weights = top / jnp.sum(top, axis=-1, keepdims=True)
    return z, indices.astype(jnp.int32), weights


def scattered(indices, weights, v):
    rows = jnp.arange(indices.shape[0])[:, None]
    return jnp.zeros((indices.shape[0], v), weights.dtype).at[rows, indices].add(weights)


def compile_step(loss, *args):
    """``jit(value_and_grad(loss))`` (in the logits) compiled for ``args``, and its temp bytes."""
    compiled = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=256 and fewer repeats")
    parser.add_argument("--n", type=int, default=None, help="examples (default 4096)")
    parser.add_argument("--v", type=int, default=32768, help="classes (default 32768)")
    parser.add_argument("--k", type=int, default=32, help="entries per example (default 32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each function")
    args = parser.parse_args(argv)
    n, v, k = args.n or (256 if args.quick else 4096), args.v, args.k
    repeats = args.repeats or (5 if args.quick else 9)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, jaxce {jaxce.__version__} "
        f"({jaxce.__file__}); backend {jax.default_backend()} ({jax.device_count()} x "
        f"{jax.devices()[0].device_kind}); N={n} V={v}; {repeats} timed pairs after "
        f"{args.warmup} warm-up calls each"
    )
    print(machine())
    print()
    sparse = lambda z, i, a: jaxce.softmax_cross_entropy_with_sparse_labels(
        z, i, a, reduction="mean")
    soft = lambda z, y: jaxce.softmax_cross_entropy(z, y, reduction="mean")
    integer = lambda z, y: jaxce.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean")

    z, indices, weights = make_inputs(n, v, k)
    dense = scattered(indices, weights, v)
    ones = jnp.ones((n, 1), jnp.float32)
    # (row, A and its args, B and its args, target on A/B time or None, A's temp allowance)
    rows = [
        (f"sparse k={k} vs dense soft", (sparse, z, indices, weights), (soft, z, dense), 0.5,
         ROW_SLACK + 32 * n * k),
        ("sparse k=1 vs integer", (sparse, z, indices[:, :1], ones), (integer, z, indices[:, 0]),
         None, ROW_SLACK + 16 * n),
    ]
    header = (f"{'case':<28}{'A ms':>9}{'B ms':>9}{'ratio':>7}{'spread':>13}{'A MiB':>9}"
              f"{'B MiB':>9}  {'target':<26}{'met'}")
    lines = [header, "-" * len(header)]
    print(*lines, sep="\n", flush=True)
    for name, (fa, *args_a), (fb, *args_b), limit, temp_limit in rows:
        ca, temp_a = compile_step(fa, *args_a)
        cb, temp_b = compile_step(fb, *args_b)
        ta, tb = paired_times(lambda ca=ca, a=args_a: ca(*a), lambda cb=cb, b=args_b: cb(*b),
                              repeats, args.warmup)
        ratios = ta / tb
        lo, hi = np.percentile(ratios, [10, 90])
        ratio = float(np.median(ratios))
        if limit is None:
            target, met = "-", "-"
        else:
            target = f"time<={limit}x, no [N,V] temp"
            met = "yes" if ratio <= limit and temp_a <= temp_limit else "NO"
        line = (f"{name:<28}{1e3 * statistics.median(ta):9.1f}{1e3 * statistics.median(tb):9.1f}"
                f"{ratio:7.2f}{f'{lo:.2f}-{hi:.2f}':>13}{temp_a / MIB:9.2f}{temp_b / MIB:9.2f}  "
                f"{target:<26}{met}")
        lines.append(line)
        print(line, flush=True)
    print()
    print("A: softmax_cross_entropy_with_sparse_labels; B: softmax_cross_entropy (dense labels "
          "built once, outside the timing) or the integer-label loss. ratio: median of per-pair "
          f"time ratios A/B; MiB = 2**20 bytes; the [N, V] float32 array is {4 * n * v / MIB:.0f} "
          "MiB.")
    return lines


if __name__ == "__main__":
    main()
