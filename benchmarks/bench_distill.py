"""Benchmark jaxce.linear_softmax_divergence against the naive distillation step, in one run.

The step is ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` (gradients of the student's
x and w) of the mean divergence between the student's softmax of ``x @ w / tau`` and a
teacher's of ``teacher_x @ teacher_w / tau`` (a teacher head: its logits are computed too):

- naive: both N x V logits materialised; ``optax.kl_divergence(log_softmax(student),
  softmax(teacher))`` for the forward KL, the plain formula for the JSD;
- jaxce: ``jaxce.linear_softmax_divergence(x, w, (teacher_x, teacher_w), kind=...)``, blocks
  of rows forward (O(N) statistics kept) and the logits recomputed backward over tiles of
  columns: no N x V array.

At N=4096, D=512 (the teacher's D too), V in {32768, 131072} (``--quick``: N=512, D=128, V in
{8192, 32768}) it prints time (median of per-pair ratios, the steps alternated), temp memory
(``temp_size_in_bytes``, compile only) and the agreement with naive. Targets: temp flat in V
(the largest within 1.25x of the smallest) and >= 30x below naive at V=131072; time <= 1.0x
naive.

Usage::

    python benchmarks/bench_distill.py              # N=4096 D=512 (tens of minutes on 2 cores)
    python benchmarks/bench_distill.py --quick      # N=512 D=128
    python benchmarks/bench_distill.py --kinds jsd --vocab 65536 --repeats 5
"""

import argparse
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import optax
from _timing import compare_steps, machine  # benchmarks/_timing.py (the script's folder)

import jaxce

MIB = 2**20
TEMPERATURE = 2.0
BETA = 0.5
TIME_TARGET = 1.0
MEMORY_TARGET = 30.0  # naive / jaxce at the largest V


def naive(kind):
    def f(x, w, tx, tw):
        log_ps = jax.nn.log_softmax(x @ w / TEMPERATURE)
        log_pt = jax.nn.log_softmax(tx @ tw / TEMPERATURE)
        if kind == "forward_kl":
            return optax.kl_divergence(log_ps, jnp.exp(log_pt)).mean()
        log_m = jnp.log(BETA * jnp.exp(log_pt) + (1 - BETA) * jnp.exp(log_ps))
        kl = lambda log_p: jnp.sum(jnp.exp(log_p) * (log_p - log_m), axis=-1)
        return (BETA * kl(log_pt) + (1 - BETA) * kl(log_ps)).mean()

    return f


def fused(kind, block_size):
    def f(x, w, tx, tw):
        return jaxce.linear_softmax_divergence(
            x, w, (tx, tw), kind=kind, beta=BETA, temperature=TEMPERATURE, block_size=block_size
        )

    return f


def step(f):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def shapes(n, d, v):
    matrix = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return matrix(n, d), matrix(d, v), matrix(n, d), matrix(d, v)


def make_inputs(n, d, v, seed=0):
    """Student and teacher activations and heads; the teacher's logits spread ~3, the
    student's ~1 (an untrained student)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    x, tx = (jax.random.normal(k, (n, d), jnp.float32) for k in keys[:2])
    w = jax.random.normal(keys[2], (d, v), jnp.float32) / np.sqrt(d)
    tw = 3.0 * jax.random.normal(keys[3], (d, v), jnp.float32) / np.sqrt(d)
    return x, w, tx, tw


def run(args):
    n, d = (512, 128) if args.quick else (4096, 512)
    vocab = args.vocab or ((8192, 32768) if args.quick else (32768, 131072))
    header = (
        f"{'kind':>11}{'V':>8}{'jaxce ms':>10}{'naive ms':>10}{'ratio':>7}{'spread':>12}"
        f"{'jaxce MiB':>11}{'naive MiB':>11}{'naive/jaxce':>13}{'loss err':>10}{'dx err':>9}"
        f"{'dw err':>9}"
    )
    print(f"distillation step, jit(value_and_grad) in the student's x and w: N={n} D={d} "
          f"float32, tau={TEMPERATURE}, a teacher head of the same D; median of {args.repeats} "
          f"pairs after {args.warmup} warm-up call(s) each", header, "-" * len(header),
          sep="\n", flush=True)
    rows = []
    for kind in args.kinds:
        for v in vocab:
            r = compare_steps(
                step(fused(kind, args.block_size)), step(naive(kind)), shapes(n, d, v),
                make_inputs(n, d, v), args.repeats, args.warmup,
            )
            lo, hi = r["spread"]
            print(
                f"{kind:>11}{v:>8}{r['ms_a']:>10.1f}{r['ms_b']:>10.1f}{r['ratio']:>7.2f}"
                f"{f'{lo:.2f}-{hi:.2f}':>12}{r['temp_a'] / MIB:>11.1f}{r['temp_b'] / MIB:>11.1f}"
                f"{r['temp_b'] / r['temp_a']:>13.1f}"
                + "".join(f"{e:>{width}.1e}" for e, width in zip(r["errors"], (10, 9, 9))),
                flush=True,
            )
            rows.append((kind, v, r))
    temps = {kind: [r["temp_a"] for k, _, r in rows if k == kind] for kind in args.kinds}
    largest = [r for _, v, r in rows if v == max(vocab)]
    flat = all(max(t) <= 1.25 * min(t) for t in temps.values())
    below = min(r["temp_b"] / r["temp_a"] for r in largest)
    worst = max(r["ratio"] for _, _, r in rows)
    print(
        "temp flat in V (each kind, <= 1.25x): "
        + ", ".join(f"{k} {min(t) / MIB:.1f}-{max(t) / MIB:.1f} MiB" for k, t in temps.items())
        + f": {'yes' if flat else 'NO'}",
        f"temp >= {MEMORY_TARGET:.0f}x below naive at V={max(vocab)}: {below:.1f}x: "
        f"{'yes' if below >= MEMORY_TARGET else 'NO'}",
        f"time <= {TIME_TARGET}x naive: worst median ratio {worst:.2f}: "
        f"{'yes' if worst <= TIME_TARGET else 'NO'}",
        sep="\n",
    )
    if args.quick or args.vocab:
        print("(the targets are set for N=4096 D=512, V 32768 and 131072; at smaller sizes a "
              "block may hold the whole batch and the temp grows with V)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=512, D=128, V in {8192, 32768}")
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="the V to run")
    parser.add_argument("--kinds", nargs="+", default=["forward_kl", "jsd"],
                        choices=("forward_kl", "reverse_kl", "jsd"), help="the divergences")
    parser.add_argument("--block-size", type=int, default=None, help="rows per block (auto)")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs (3; 5 quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each (>= 1)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 3)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"command: {shlex.join([sys.executable, *sys.argv])}\n"
          f"jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, jaxce "
          f"{jaxce.__version__}; backend {jax.default_backend()}\n{machine()}\n"
          f"load average {load} at the start (a shared machine: absolute times are noisy, the "
          "paired ratios less so)\n")
    run(args)
    print("\nratio: median of per-pair time ratios jaxce/naive (spread: 10-90% range); "
          "MiB = 2**20 B; err: max |jaxce - naive| / max |naive|")


if __name__ == "__main__":
    main()
