"""Benchmark jaxce.linear_label_log_probs against the naive code on a GRPO-style step, in one run.

The step is ``jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))`` (gradients of x and w)
of the policy-gradient objective ``sum_n a_n log p_n + beta sum_n H_n`` with
``p = softmax(x @ w / tau)``, the log-probability ``log p_n`` of each example's sampled label
and the entropy ``H_n`` of its softmax:

- naive: ``log_p = jax.nn.log_softmax(x @ w / tau)`` gathered at the labels, the entropy
  ``-sum(p * log_p)`` from the materialised probabilities ``p = exp(log_p)``; it holds the
  N x V logits, log-probabilities, probabilities and their gradients;
- jaxce: ``jaxce.linear_label_log_probs(x, w, labels, temperature=tau, return_entropy=True)``,
  blocks of rows forward (O(N) statistics kept) and the logits recomputed backward over tiles
  of columns: four matmuls against the naive three, no N x V array.

Both are compared at N=4096, D=512, V in {32768, 131072} (``--quick``: N=512, D=128, V in
{8192, 32768}) on

- memory: ``temp_size_in_bytes`` of the compiled step (compile only, deterministic); targets:
  flat in V (the largest V within 1.25x of the smallest) and >= 30x below naive at V=131072;
- time: the median of per-pair ratios of wall times, the two steps run alternately (order
  flipped every pair, ``benchmarks/_timing.py``) so that load drift on a shared machine hits
  both alike; target <= 1.3x naive;
- agreement: the largest difference of the objective and of the gradients from the naive
  ones, relative to the largest naive entry (float32 both).

Usage::

    python benchmarks/bench_rl.py              # N=4096 D=512, V 32768 and 131072 (minutes)
    python benchmarks/bench_rl.py --quick      # N=512 D=128, V 8192 and 32768
    python benchmarks/bench_rl.py --repeats 5 --warmup 1 --vocab 65536
"""

import argparse
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
from _timing import compare_steps, machine  # benchmarks/_timing.py (the script's folder)

import jaxce

MIB = 2**20
TEMPERATURE = 0.7
BETA = 0.01  # the entropy bonus's coefficient
TIME_TARGET = 1.3
MEMORY_TARGET = 30.0  # naive / jaxce at the largest V


def naive(x, w, y, a):
    log_p = jax.nn.log_softmax(x @ w / TEMPERATURE, axis=-1)
    log_probs = jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]
    p = jnp.exp(log_p)
    entropy = -jnp.sum(p * log_p, axis=-1)
    return jnp.sum(a * log_probs) + BETA * jnp.sum(entropy)


def fused(block_size):
    def f(x, w, y, a):
        log_probs, entropy = jaxce.linear_label_log_probs(
            x, w, y, temperature=TEMPERATURE, return_entropy=True, block_size=block_size
        )
        return jnp.sum(a * log_probs) + BETA * jnp.sum(entropy)

    return f


def step(f):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def shapes(n, d, v):
    return (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )


def make_inputs(n, d, v, seed=0):
    """Activations, a policy head of logits with spread ~2, sampled labels, advantages."""
    kx, kw, ky, ka = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n, d), jnp.float32)
    w = 2.0 * jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)
    y = jax.random.randint(ky, (n,), 0, v, jnp.int32)
    a = jax.random.normal(ka, (n,), jnp.float32)
    return x, w, y, a


def measure(n, d, v, args):
    """``(line, ratio, jaxce temp bytes, naive temp bytes)`` of one vocabulary size."""
    r = compare_steps(
        step(fused(args.block_size)), step(naive), shapes(n, d, v), make_inputs(n, d, v),
        args.repeats, args.warmup,
    )
    lo, hi = r["spread"]
    obj, dx, dw = r["errors"]
    line = (
        f"{v:>7}{r['ms_a']:>10.1f}{r['ms_b']:>10.1f}{r['ratio']:>7.2f}{f'{lo:.2f}-{hi:.2f}':>12}"
        f"{r['temp_a'] / MIB:>11.1f}{r['temp_b'] / MIB:>11.1f}{r['temp_b'] / r['temp_a']:>13.1f}"
        f"{obj:>9.1e}{dx:>9.1e}{dw:>9.1e}"
    )
    return line, r["ratio"], r["temp_a"], r["temp_b"]


def run(args):
    n, d = (512, 128) if args.quick else (4096, 512)
    vocab = args.vocab or ((8192, 32768) if args.quick else (32768, 131072))
    header = (
        f"{'V':>7}{'jaxce ms':>10}{'naive ms':>10}{'ratio':>7}{'spread':>12}"
        f"{'jaxce MiB':>11}{'naive MiB':>11}{'naive/jaxce':>13}{'obj err':>9}{'dx err':>9}"
        f"{'dw err':>9}"
    )
    title = (
        f"GRPO-style step, jit(value_and_grad) in x and w: N={n} D={d} float32, "
        f"tau={TEMPERATURE}, beta={BETA}; median of {args.repeats} pairs after "
        f"{args.warmup} warm-up call(s) each"
    )
    lines = [title, header, "-" * len(header)]
    print(*lines, sep="\n", flush=True)
    rows = []
    for v in vocab:
        line, *row = measure(n, d, v, args)
        lines.append(line)
        print(line, flush=True)
        rows.append((v, *row))
    (v_min, _, small, _), (v_max, _, large, naive_large) = rows[0], rows[-1]
    worst = max(ratio for _, ratio, _, _ in rows)
    flat = "yes" if large <= 1.25 * small else "NO"
    below = "yes" if naive_large >= MEMORY_TARGET * large else "NO"
    fast = "yes" if worst <= TIME_TARGET else "NO"
    targets = [
        f"temp flat in V: {large / MIB:.1f} MiB at V={v_max}, {small / MIB:.1f} MiB at "
        + f"V={v_min} (<= 1.25x): {flat}",
        f"temp >= {MEMORY_TARGET:.0f}x below naive at V={v_max}: {naive_large / large:.1f}x: "
        + below,
        f"time <= {TIME_TARGET}x naive: worst median ratio {worst:.2f}: {fast}",
    ]
    if args.quick or args.vocab:
        targets.append("(the targets are set for N=4096 D=512, V 32768 and 131072; at smaller "
                       "sizes a block may hold the whole batch and the temp grows with V)")
    print(*targets, sep="\n", flush=True)
    return lines + targets


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=512, D=128, V in {8192, 32768}")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="the V to run")
    parser.add_argument("--block-size", type=int, default=None, help="rows per block (default: auto)")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs per V (default 3; 5 quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each step (>= 1)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 3)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, jaxce {jaxce.__version__}; "
        f"backend {jax.default_backend()}\n{machine()}\nload average {load} at the start "
        "(a shared machine: absolute times are noisy, the paired ratios less so)\n"
    )
    lines = run(args)
    print("\nratio: median of per-pair time ratios jaxce/naive (spread: 10-90% range); "
          "MiB = 2**20 B; err: max |jaxce - naive| / max |naive|")
    return lines


if __name__ == "__main__":
    main()
