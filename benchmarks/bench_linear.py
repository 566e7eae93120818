"""Benchmark jaxce.linear_softmax_cross_entropy against the naive ``x @ w`` + optax, in one run.

Naive: ``optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()``, which holds the
N x V logits and their gradient. Both are compiled as ``jax.jit(jax.value_and_grad(f,
argnums=(0, 1)))`` (gradients with respect to x and w) and compared on

- memory: ``temp_size_in_bytes`` of the compiled step (compile only, deterministic) at N=4096,
  D=512, V in {32768, 65536, 131072, 262144}; targets: flat in V, >= 50x below naive at
  V=65536 and >= 200x at V=262144;
- time: the median of per-pair ratios of wall times, the two steps run alternately (order
  flipped every pair) so that load drift on a shared machine hits both alike, at N=2048,
  D=256, V=32768: float32 (target <= 1.0x), bfloat16 (both sides bf16), ``reduction="none"``
  (differentiating ``sum(loss)``), and an options row (``label_smoothing=0.1, z_loss=1e-4,
  logit_softcap=30, ignore_index=-100`` on 1/8 of the labels);
- gradient filtering (``gradient_filter=2**-12``) on peaked, trained-like softmaxes at the same
  shape, ``x = g + b w_y / |w_y|^2`` (``g`` standard normal) lifting the label's logit by b:
  "confident": b = 24 over logits of spread ~1.5, every probability but the label's < 1e-6 and
  the label's > 1 - 1e-5 (the gradient itself is then ~1e-7: the filter drops all of it);
  "zipf": labels drawn from Zipf's law over a frequency-sorted vocabulary (P(k) ~ 1/k), a
  unigram log-prior -log k in the logits (through a constant feature of x) and b = 12, so the
  median p_y is 0.98 and the rare classes' slabs hold nothing above the threshold unless a
  label falls there; "1/64 unsure": the confident case with every 64th row unboosted: a block
  of rows keeps every slab where one of its rows has a probability above the threshold, so
  nothing is skipped (the filter's overhead). Paired times of the filtered step against the
  exact (unfiltered) one and against naive, the share of (row block, column slab) pairs
  skipped, and the largest change of a gradient entry relative to the largest exact entry.

Usage::

    python benchmarks/bench_linear.py              # the full table (a few minutes on 2 cores)
    python benchmarks/bench_linear.py --quick      # smaller time shapes, fewer repeats
    python benchmarks/bench_linear.py --block-size 64 --only time
    python benchmarks/bench_linear.py --only filter
    python benchmarks/bench_linear.py --only sweep --repeats 3   # V = 32768 ... 262144

- sweep: V in {32768, 65536, 131072, 262144} (float32; bfloat16 at 65536 and 262144) and a
  ragged N (not a power of two) at V=131072: how the step walks (the gradients fused into the
  sweep over blocks of rows, or a second sweep over tiles of columns), the paired time ratio
  against naive at ``--sweep-shape`` (default N=2048 D=256: N=4096 D=512 takes minutes per
  row on 2 cores) and temp MiB at N=4096 (4000) D=512.
"""

import argparse
import shlex
import statistics
import sys

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import optax

import jaxce
from _timing import paired_times  # benchmarks/_timing.py (the script's folder)
from jaxce import _linear

IGNORE = -100
MIB = 2**20
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4, logit_softcap=30.0, ignore_index=IGNORE)


def naive(x, w, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()


def blockwise(block_size, reduction="mean", **options):
    def f(x, w, y):
        out = jaxce.linear_softmax_cross_entropy(
            x, w, y, reduction=reduction, block_size=block_size, **options
        )
        return jnp.sum(out)

    return f


def step(f):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def temp_bytes(f, n, d, v, dtype=jnp.float32):
    shapes = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    return step(f).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def make_inputs(n, d, v, dtype, seed=0):
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v, jnp.int32)
    return x, w, y


def memory_table(args):
    n, d = 4096, 512
    header = f"{'V':>8}{'block':>7}{'jaxce MiB':>11}{'naive MiB':>11}{'naive/jaxce':>13}  target"
    lines = [f"memory: temp_size_in_bytes of jit(value_and_grad), N={n} D={d} float32", header]
    lines.append("-" * len(header))
    print(*lines, sep="\n", flush=True)
    for v in (32768, 65536, 131072, 262144):
        ours = temp_bytes(blockwise(args.block_size), n, d, v)
        theirs = temp_bytes(naive, n, d, v)
        block = args.block_size or _sweeps.default_block_size(n, v)
        target = {65536: ">=50x", 262144: ">=200x"}.get(v, "")
        if target:
            target += "  " + ("yes" if theirs >= float(target[2:-1]) * ours else "NO")
        line = f"{v:>8}{block:>7}{ours / MIB:>11.1f}{theirs / MIB:>11.1f}{theirs / ours:>13.1f}  {target}"
        lines.append(line)
        print(line, flush=True)
    return lines


def time_table(args):
    n, d, v = (512, 128, 8192) if args.quick else (2048, 256, 32768)
    block = args.block_size or _sweeps.default_block_size(n, v)
    rows = [
        ("float32 mean", jnp.float32, blockwise(args.block_size), False, "<=1.0x"),
        ("bfloat16 mean", jnp.bfloat16, blockwise(args.block_size), False, ""),
        ("float32 none", jnp.float32, blockwise(args.block_size, "none"), False, ""),
        ("float32 options", jnp.float32, blockwise(args.block_size, **OPTIONS), True, ""),
    ]
    header = (
        f"{'case':<17}{'jaxce ms':>10}{'naive ms':>10}{'ratio':>7}{'spread':>12}"
        f"{'jaxce MiB':>11}{'naive MiB':>11}  target"
    )
    lines = [
        f"time: N={n} D={d} V={v}, block_size={block}; median of {args.repeats} pairs "
        f"after {args.warmup} warm-up calls each",
        header,
        "-" * len(header),
    ]
    print(*lines, sep="\n", flush=True)
    for name, dtype, f, ignored, target in rows:
        x, w, y = make_inputs(n, d, v, dtype)
        ya = jnp.where(jnp.arange(n) % 8 == 3, IGNORE, y) if ignored else y
        fa, fb = step(f), step(naive)
        ta, tb = paired_times(lambda: fa(x, w, ya), lambda: fb(x, w, y), args.repeats, args.warmup)
        ratios = ta / tb
        lo, hi = np.percentile(ratios, [10, 90])
        ratio = float(np.median(ratios))
        mem_a, mem_b = temp_bytes(f, n, d, v, dtype), temp_bytes(naive, n, d, v, dtype)
        met = ("yes" if ratio <= float(target[2:-1]) else "NO") if target else ""
        line = (
            f"{name:<17}{1e3 * statistics.median(ta):>10.1f}{1e3 * statistics.median(tb):>10.1f}"
            f"{ratio:>7.2f}{f'{lo:.2f}-{hi:.2f}':>12}{mem_a / MIB:>11.1f}{mem_b / MIB:>11.1f}"
            f"  {target} {met}"
        )
        lines.append(line)
        print(line, flush=True)
    return lines


SWEEP_V = (32768, 65536, 131072, 262144)


def walk(n, d, v, block_size):
    """How the step walks: "fused" (gradients in the row sweep) or "tiled" (a column sweep)."""
    block = block_size or _sweeps.default_block_size(n, v)
    fuses = getattr(_linear, "fuses_gradients", None)  # absent before the column-tiled sweep
    if fuses is None:
        return f"fused, block {block}"
    rows, cols = _sweeps.tile_shape(n, d, v, block)
    return f"fused, block {block}" if fuses(v, block, (rows, cols)) else f"tiled {rows}x{cols}"


def sweep_table(args):
    """V sweep, jaxce vs naive: temp MiB at N=4096 D=512 and paired times at args.sweep_shape."""
    mem_n, mem_d = 4096, 512
    n, d = args.sweep_shape
    cases = [(n, v, jnp.float32) for v in SWEEP_V]
    cases += [(n, v, jnp.bfloat16) for v in (SWEEP_V[1], SWEEP_V[3])]
    ragged_n = n * 4000 // 4096  # not a power of two: a ragged last block of rows
    cases.append((ragged_n, SWEEP_V[2], jnp.float32))
    header = (
        f"{'N':>6}{'V':>8}{'dtype':>10}{'  walk':<22}{'jaxce ms':>10}{'naive ms':>10}{'ratio':>7}"
        f"{'spread':>12}{'jaxce MiB':>11}{'naive MiB':>11}"
    )
    lines = [
        f"sweep: jit(value_and_grad) w.r.t. (x, w), mean; MiB (temp_size_in_bytes) at N={mem_n} "
        f"(N=4000 in the ragged row) D={mem_d}; times at N={n} D={d} (N={ragged_n} ragged), "
        f"median of {args.repeats} pairs after {args.warmup} warm-up calls each",
        header,
        "-" * len(header),
    ]
    print(*lines, sep="\n", flush=True)
    f = blockwise(args.block_size)
    for tn, v, dtype in cases:
        mn = mem_n if tn == n else 4000
        x, w, y = make_inputs(tn, d, v, dtype)
        fa, fb = step(f), step(naive)
        ta, tb = paired_times(lambda: fa(x, w, y), lambda: fb(x, w, y), args.repeats, args.warmup)
        del x, w, y
        ratios = ta / tb
        lo, hi = np.percentile(ratios, [10, 90])
        mem_a = temp_bytes(f, mn, mem_d, v, dtype)
        mem_b = temp_bytes(naive, mn, mem_d, v, dtype)
        name = jnp.dtype(dtype).name
        line = (
            f"{tn:>6}{v:>8}{name:>10}  {walk(tn, d, v, args.block_size):<20}"
            f"{1e3 * statistics.median(ta):>10.1f}{1e3 * statistics.median(tb):>10.1f}"
            f"{float(np.median(ratios)):>7.2f}{f'{lo:.2f}-{hi:.2f}':>12}"
            f"{mem_a / MIB:>11.1f}{mem_b / MIB:>11.1f}"
        )
        lines.append(line)
        print(line, flush=True)
    return lines


FILTER = 2.0**-12  # in the range of Cut Cross-Entropy's float32 default


def make_peaked_inputs(n, d, v, case, seed=0):
    """``x @ w`` with the label's logit lifted (see the module docstring for the cases)."""
    x, w, y = (np.array(a) for a in make_inputs(n, d, v, jnp.float32, seed))
    boost = 24.0
    if case == "zipf":
        boost, rank = 12.0, np.arange(1, v + 1)
        y = np.random.default_rng(seed).choice(v, size=n, p=(1 / rank) / np.sum(1 / rank))
        w[0], x[:, 0] = -np.log(rank), 1.0  # the unigram log-prior through a constant feature
    wy = w[1:, y].T
    scale = boost / np.sum(wy * wy, axis=1, keepdims=True)
    if case == "1/64 unsure":
        scale[::64] = 0.0
    x[:, 1:] += scale * wy
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(y, jnp.int32)


def skipped_share(x, w, y, block, threshold):
    """Share of (row block, column slab) pairs whose |p - y| all lie below ``threshold``."""
    cols = min(_sweeps._slab_columns(w.shape[0]), _sweeps.FILTER_COLUMNS)
    skipped = total = 0
    for r in range(0, x.shape[0], block):
        z = np.asarray(x[r : r + block] @ w, np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(p.shape[0]), np.asarray(y[r : r + block])] -= 1.0
        for c in range(0, w.shape[1], cols):
            total += 1
            skipped += bool(np.abs(p[:, c : c + cols]).max() < threshold)
    return skipped / total


def rel_err(got, want):
    return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def filter_table(args):
    n, d, v = (512, 128, 8192) if args.quick else (2048, 256, 32768)
    block = args.block_size or _sweeps.default_block_size(n, v)
    header = (
        f"{'case':<19}{'filt ms':>9}{'exact ms':>10}{'naive ms':>10}{'f/exact':>9}{'f/naive':>9}"
        f"{'skipped':>9}{'dx err':>9}{'dw err':>9}"
    )
    lines = [
        f"gradient_filter={FILTER:.3g} (2**-12): N={n} D={d} V={v} float32, block_size={block}, "
        f"slab={min(_sweeps._slab_columns(d), _sweeps.FILTER_COLUMNS)} columns; "
        f"median of {args.repeats} pairs",
        header,
        "-" * len(header),
    ]
    print(*lines, sep="\n", flush=True)
    filtered = step(blockwise(args.block_size, gradient_filter=FILTER))
    exact = step(blockwise(args.block_size))
    fn = step(naive)
    for name in ("confident", "zipf", "1/64 unsure"):
        x, w, y = make_peaked_inputs(n, d, v, name)
        ta, tb = paired_times(lambda: filtered(x, w, y), lambda: exact(x, w, y), args.repeats,
                              args.warmup)
        tc, td = paired_times(lambda: filtered(x, w, y), lambda: fn(x, w, y), args.repeats,
                              args.warmup)
        (lf, (dxf, dwf)), (le, (dxe, dwe)) = filtered(x, w, y), exact(x, w, y)
        assert lf == le, (lf, le)  # the filter leaves the loss alone
        line = (
            f"{name:<19}{1e3 * statistics.median(ta):>9.1f}{1e3 * statistics.median(tb):>10.1f}"
            f"{1e3 * statistics.median(td):>10.1f}{np.median(ta / tb):>9.2f}"
            f"{np.median(tc / td):>9.2f}{skipped_share(x, w, y, block, FILTER):>9.1%}"
            f"{rel_err(dxf, dxe):>9.1e}{rel_err(dwf, dwe):>9.1e}"
        )
        lines.append(line)
        print(line, flush=True)
    print("dx err, dw err: max |filtered - exact| / max |exact| (1.0: all of it dropped)",
          flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=512, D=128, V=8192 for the times")
    parser.add_argument("--block-size", type=int, default=None, help="rows per block (default: auto)")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs per row (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each function")
    parser.add_argument("--only", choices=("memory", "time", "filter", "sweep"), default=None)
    parser.add_argument(
        "--sweep-shape", type=int, nargs=2, default=(2048, 256), metavar=("N", "D"),
        help="N and D of the sweep's times (default 2048 256; its memory is at 4096 512)",
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 9)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, optax {optax.__version__}, "
        f"jaxce {jaxce.__version__}; backend {jax.default_backend()} "
        f"({jax.device_count()} x {jax.devices()[0].device_kind})\n"
    )
    lines = []
    if args.only in (None, "memory"):
        lines += memory_table(args) + [""]
    if args.only in (None, "time"):
        lines += time_table(args) + [""]
    if args.only in (None, "filter"):
        lines += filter_table(args) + [""]
    if args.only in (None, "sweep"):
        lines += sweep_table(args)
    print("\nratio: median of per-pair time ratios jaxce/naive (spread: 10-90% range); MiB = 2**20 B")
    return lines


if __name__ == "__main__":
    main()
