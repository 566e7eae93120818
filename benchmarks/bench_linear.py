"""Benchmark jaxce.linear_softmax_cross_entropy against the naive ``x @ w`` + optax and jax-cce.

Naive: ``optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()``, which holds the
N x V logits and their gradient. The peer, jax-cce (PyPI ``jax-cce``, a JAX port of Apple's Cut
Cross-Entropy; ``pip install "jaxce[bench]"``), enters the sweep only, and is skipped with a note
when it is not installed. All are compiled as ``jax.jit(jax.value_and_grad(f, argnums=(0, 1)))``
(gradients with respect to x and w) and compared on

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
  skipped, and the largest change of a gradient entry relative to the largest exact entry;
- matmuls: the three matmuls of the naive step timed alone, beside the naive and jaxce steps,
  at ``--sweep-shape`` with D halved and doubled (V=65536): what bounds the fused step at wide D
  (see ``matmul_table``);
- sweep: jaxce, naive and jax-cce side by side at N=4096, D=512 over V in {32768, 65536,
  131072, 262144} (float32; bfloat16 at 65536 and 262144), a ragged N=4000 (not a power of
  two) at V=131072 and D in {1024, 2048} at V=65536. jax-cce takes ``w`` as [V, D] (it computes
  ``x @ w.T``): each side gets its natural layout, jax-cce's ``w.T`` made once outside the
  timed step. First, the three agree on a small case (N=300, D=64, V=5000: the relative max
  differences of the loss, dx and dw from naive are printed, and asserted below 1e-4). Each
  row: how jaxce walks (the gradients fused into the sweep over blocks of rows, or a second
  sweep over tiles of columns); the naive step's median ms; the medians of the per-round time
  ratios jaxce/naive (with its 10-90% spread), jax-cce/naive and jaxce/jax-cce, the three steps
  run in turn with their order rotated every round; ``temp_size_in_bytes`` of each in MiB. The
  times are at ``--sweep-shape`` (default 4096 512; a row's N and D are scaled by it / (4096,
  512)), the MiB always at the full shapes. Targets, checked in the last column and line:
  jaxce <= 1.0x naive at every V and faster than jax-cce; jaxce's temp flat in V (max <= 1.25x
  min over the float32 rows), <= 64 MiB and below jax-cce's.

The header names the CPU (model, cores, AVX2/AVX-512/AMX flags from /proc/cpuinfo where there
is one) and the devices; the script runs unchanged on a GPU (``JAX_PLATFORMS=cuda``).

Usage::

    python benchmarks/bench_linear.py              # every table (the sweep: hours on 2 cores)
    python benchmarks/bench_linear.py --quick      # smaller time shapes, fewer repeats
    python benchmarks/bench_linear.py --block-size 64 --only time
    python benchmarks/bench_linear.py --only filter
    python benchmarks/bench_linear.py --only sweep                  # N=4096 D=512
    python benchmarks/bench_linear.py --only sweep --sweep-shape 2048 256 --repeats 3
    python benchmarks/bench_linear.py --only matmuls --repeats 3    # N=4096, D=256/512/1024
    JAX_PLATFORMS=cuda python benchmarks/bench_linear.py --only sweep

On 2 shared CPU cores, ``--only sweep --quick`` (times at N=512 D=128) took 3 to 6 minutes and
``--only sweep --sweep-shape 2048 256 --repeats 3`` 12 minutes; the default sweep (N=4096 D=512,
9 rounds after 2 warm-up calls) does 8x the work per step and about 2x the calls: some 3-4 hours
there (and ~11 GiB of naive temporaries at V=262144), minutes on a GPU.
"""

import argparse
import functools
import importlib.metadata
import shlex
import statistics
import sys

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import optax
from _timing import machine, paired_times, rotated_times  # benchmarks/_timing.py

import jaxce
from jaxce import _sweeps, _tiles

try:
    import jax_cce  # the peer (Cut Cross-Entropy in JAX): pip install "jaxce[bench]"
except ImportError:
    jax_cce = None

IGNORE = -100
MIB = 2**20
OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-4, "logit_softcap": 30.0, "ignore_index": IGNORE}


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


def temp_bytes(f, n, d, v, dtype=jnp.float32, transposed=False):
    """Temp bytes of ``step(f)``, its ``w`` [D, V] (or [V, D] if ``transposed``)."""
    shapes = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((v, d) if transposed else (d, v), dtype),
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
        line = (
            f"{v:>8}{block:>7}{ours / MIB:>11.1f}{theirs / MIB:>11.1f}{theirs / ours:>13.1f}"
            f"  {target}"
        )
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
        (
            f"time: N={n} D={d} V={v}, block_size={block}; median of {args.repeats} pairs "
            f"after {args.warmup} warm-up calls each"
        ),
        header,
        "-" * len(header),
    ]
    print(*lines, sep="\n", flush=True)
    for name, dtype, f, ignored, target in rows:
        x, w, y = make_inputs(n, d, v, dtype)
        ya = jnp.where(jnp.arange(n) % 8 == 3, IGNORE, y) if ignored else y
        fa, fb = step(f), step(naive)
        calls = functools.partial(fa, x, w, ya), functools.partial(fb, x, w, y)
        ta, tb = paired_times(*calls, args.repeats, args.warmup)
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
SWEEP_SHAPE = (4096, 512)  # N, D of the sweep's rows (and of its targets)
SWEEP_TARGET_MIB = 64


def cut_cross_entropy(x, wt, y):
    """The peer jax-cce (mean, float32 result) on ``wt`` = ``w.T`` [V, D], its natural layout."""
    return jax_cce.linear_cross_entropy(x, wt, y)


def walk(n, d, v, dtype, block_size):
    """How the step walks: "fused" (gradients in the row sweep) or "tiled" (a column sweep)."""
    block = block_size or _sweeps.default_block_size(n, v)
    rows, cols = _tiles.tile_shape(n, d, v, block)
    fused = _sweeps.fuses_gradients(v, block, (rows, cols), dtype)
    return f"fused, block {block}" if fused else f"tiled {rows}x{cols}"


def sweep_cases():
    """(N, D, V, dtype) of the sweep's rows at full size (the memory columns' shapes)."""
    n, d = SWEEP_SHAPE
    cases = [(n, d, v, jnp.float32) for v in SWEEP_V]
    cases += [(n, d, v, jnp.bfloat16) for v in (SWEEP_V[1], SWEEP_V[3])]
    cases.append((4000, d, SWEEP_V[2], jnp.float32))  # not a power of two: a ragged last block
    cases += [(n, dd, SWEEP_V[1], jnp.float32) for dd in (1024, 2048)]
    return cases


def agreement(n=300, d=64, v=5000):
    """Relative max differences from naive of the loss, dx and dw, for jaxce and jax-cce.

    V=5000 is not a multiple of jax-cce's 4096-column chunks, nor N=300 of a power of two.
    """
    x, w, y = make_inputs(n, d, v, jnp.float32, seed=1)
    loss, (dx, dw) = step(naive)(x, w, y)
    ours_loss, (ours_dx, ours_dw) = step(blockwise(None))(x, w, y)
    errors = {"jaxce": (rel_err(ours_loss, loss), rel_err(ours_dx, dx), rel_err(ours_dw, dw))}
    if jax_cce is not None:
        cce_loss, (cce_dx, cce_dwt) = step(cut_cross_entropy)(x, w.T, y)
        errors["jax-cce"] = (rel_err(cce_loss, loss), rel_err(cce_dx, dx), rel_err(cce_dwt.T, dw))
    return errors


def sweep_table(args):
    """jaxce, naive and jax-cce side by side over V (and a ragged N, and larger D).

    Paired times at ``args.sweep_shape`` (the rows' N and D scaled by it / (4096, 512)), temp
    MiB (compile only) at the rows' full N and D.
    """
    n, d = args.sweep_shape
    peers = jax_cce is not None
    errors = agreement()
    lines = [
        "agreement with naive, N=300 D=64 V=5000 float32, max |diff| / max |naive|: "
        + "; ".join(
            f"{name} loss {e[0]:.1e} dx {e[1]:.1e} dw {e[2]:.1e}" for name, e in errors.items()
        )
    ]
    if not peers:
        lines.append(
            "jax-cce is not installed (pip install 'jaxce[bench]'): its columns are skipped"
        )
    print(*lines, sep="\n", flush=True)
    assert all(e < 1e-4 for es in errors.values() for e in es), errors
    header = (
        f"{'N':>6}{'D':>6}{'V':>8}{'dtype':>10}  {'walk':<20}{'naive ms':>10}{'jaxce/naive':>12}"
        f"{'spread':>11}{'cce/naive':>10}{'jaxce/cce':>10}{'jaxce MiB':>10}{'cce MiB':>9}"
        f"{'naive MiB':>10}  targets"
    )
    lines += [
        (
            f"sweep: jit(value_and_grad) w.r.t. (x, w), mean; times at N, D below (--sweep-shape "
            f"{n} {d} scales the full shapes {SWEEP_SHAPE[0]} {SWEEP_SHAPE[1]}), median of "
            f"{args.repeats} rounds ({'jaxce, naive, jax-cce' if peers else 'jaxce, naive'} in "
            f"rotated order) after {args.warmup} warm-up calls each;"
        ),
        (
            "MiB (temp_size_in_bytes) at the full shapes: N=4096 (4000 in the ragged row), D=512 "
            "(1024, 2048 in the D rows); jax-cce takes w.T [V, D], transposed once outside the step"
        ),
        header,
        "-" * len(header),
    ]
    print(*lines[-4:], sep="\n", flush=True)
    f = blockwise(args.block_size)
    temps = {}
    for mem_n, mem_d, v, dtype in sweep_cases():
        tn, td = n * mem_n // SWEEP_SHAPE[0], d * mem_d // SWEEP_SHAPE[1]
        x, w, y = make_inputs(tn, td, v, dtype)
        calls = [functools.partial(step(f), x, w, y), functools.partial(step(naive), x, w, y)]
        if peers:  # its natural layout, transposed once outside the timed step
            wt = jax.block_until_ready(w.T)
            calls.append(functools.partial(step(cut_cross_entropy), x, wt, y))
        times = rotated_times(calls, args.repeats, args.warmup)
        del x, w, y, calls
        ta, tb = times[:2]
        ratio = float(np.median(ta / tb))
        lo, hi = np.percentile(ta / tb, [10, 90])
        mem = [temp_bytes(f, mem_n, mem_d, v, dtype), temp_bytes(naive, mem_n, mem_d, v, dtype)]
        failed = [] if ratio <= 1.0 else ["slower than naive"]
        failed += [] if mem[0] <= SWEEP_TARGET_MIB * MIB else [f"> {SWEEP_TARGET_MIB} MiB"]
        cce = "-", "-", "-"
        if peers:
            tc = times[2]
            mem.append(temp_bytes(cut_cross_entropy, mem_n, mem_d, v, dtype, transposed=True))
            cce = f"{np.median(tc / tb):.2f}", f"{np.median(ta / tc):.2f}", f"{mem[2] / MIB:.1f}"
            failed += [] if np.median(ta / tc) < 1.0 else ["slower than jax-cce"]
            failed += [] if mem[0] < mem[2] else ["MiB >= jax-cce's"]
        name = jnp.dtype(dtype).name
        temps[mem_n, mem_d, v, name] = mem
        line = (
            f"{tn:>6}{td:>6}{v:>8}{name:>10}  {walk(tn, td, v, dtype, args.block_size):<20}"
            f"{1e3 * statistics.median(tb):>10.1f}{ratio:>12.2f}"
            f"{f'{lo:.2f}-{hi:.2f}':>11}{cce[0]:>10}{cce[1]:>10}{mem[0] / MIB:>10.1f}{cce[2]:>9}"
            f"{mem[1] / MIB:>10.1f}  {', '.join(failed) or 'met'}"
        )
        lines.append(line)
        print(line, flush=True)
    over_v = [temps[(*SWEEP_SHAPE, v, "float32")][0] for v in SWEEP_V]
    flat = max(over_v) / min(over_v)
    line = (
        f"jaxce temp over V (float32, N={SWEEP_SHAPE[0]} D={SWEEP_SHAPE[1]}): "
        f"{min(over_v) / MIB:.1f}-{max(over_v) / MIB:.1f} MiB, max/min {flat:.2f} "
        f"(target <= 1.25: {'met' if flat <= 1.25 else 'NO'})"
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
        (
            f"gradient_filter={FILTER:.3g} (2**-12): N={n} D={d} V={v} float32, "
            f"block_size={block}, slab={min(_sweeps._slab_columns(d), _sweeps.FILTER_COLUMNS)} "
            f"columns; median of {args.repeats} pairs"
        ),
        header,
        "-" * len(header),
    ]
    print(*lines, sep="\n", flush=True)
    filtered = step(blockwise(args.block_size, gradient_filter=FILTER))
    exact = step(blockwise(args.block_size))
    steps = filtered, exact, step(naive)
    for name in ("confident", "zipf", "1/64 unsure"):
        x, w, y = make_peaked_inputs(n, d, v, name)
        run_filtered, run_exact, run_naive = (functools.partial(g, x, w, y) for g in steps)
        ta, tb = paired_times(run_filtered, run_exact, args.repeats, args.warmup)
        tc, td = paired_times(run_filtered, run_naive, args.repeats, args.warmup)
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
    print(
        "dx err, dw err: max |filtered - exact| / max |exact| (1.0: all of it dropped)", flush=True
    )
    return lines


def matmul_table(args):
    """What bounds the fused step at wide D: its matmuls, timed alone beside the two steps.

    The naive step is three matmuls (``x @ w``, ``dz @ w.T``, ``x.T @ dz``) plus its
    elementwise passes over the [N, V] logits ("rest" = naive - the three); a fused loss that
    never holds the logits computes them twice (four matmuls). It can only match naive where
    one more matmul costs less than that rest. Rows at ``args.sweep_shape`` (N, D), D halved and
    doubled, V=65536, float32.
    """
    n, d = args.sweep_shape
    v = SWEEP_V[1]
    header = (
        f"{'N':>6}{'D':>6}{'V':>8}{'x@w':>9}{'dz@wT':>9}{'xT@dz':>9}{'naive':>9}{'rest':>8}"
        f"{'jaxce':>9}{'jaxce/naive':>13}"
    )
    lines = ["matmuls: ms of each alone and of the two value_and_grad steps, float32", header]
    lines.append("-" * len(header))
    print("\n".join(lines), flush=True)
    for dd in (d // 2, d, 2 * d):
        x, w, y = make_inputs(n, dd, v, jnp.float32)
        dz = jax.random.normal(jax.random.key(3), (n, v), jnp.float32)
        fns = [
            functools.partial(jax.jit(lambda x, w: x @ w), x, w),
            functools.partial(jax.jit(lambda dz, w: dz @ w.T), dz, w),
            functools.partial(jax.jit(lambda x, dz: x.T @ dz), x, dz),
            functools.partial(step(naive), x, w, y),
            functools.partial(step(blockwise(args.block_size)), x, w, y),
        ]
        times = rotated_times(fns, args.repeats, args.warmup)
        xw, dzw, xdz, naive_ms, ours = (1e3 * float(np.median(t)) for t in times)
        ratio = float(np.median(times[4] / times[3]))
        rest = naive_ms - xw - dzw - xdz
        line = (
            f"{n:>6}{dd:>6}{v:>8}{xw:9.1f}{dzw:9.1f}{xdz:9.1f}{naive_ms:9.1f}{rest:8.1f}"
            f"{ours:9.1f}{ratio:13.2f}"
        )
        lines.append(line)
        print(line, flush=True)
        del x, w, y, dz, fns
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="N=512, D=128 (V=8192 but in the sweep) for the times"
    )
    parser.add_argument(
        "--block-size", type=int, default=None, help="rows per block (default: auto)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed pairs (rounds) per row (default 9)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each function")
    parser.add_argument("--only", choices=("memory", "time", "filter", "sweep", "matmuls"), default=None)
    parser.add_argument(
        "--sweep-shape",
        type=int,
        nargs=2,
        default=None,
        metavar=("N", "D"),
        help="N and D of the sweep's times (default 4096 512, --quick 512 128; its memory is "
        "always at 4096 512)",
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 9)
    args.sweep_shape = args.sweep_shape or ((512, 128) if args.quick else SWEEP_SHAPE)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, optax {optax.__version__}, "
        f"jaxce {jaxce.__version__}; backend {jax.default_backend()}; "
        f"jax-cce {importlib.metadata.version('jax-cce') if jax_cce else 'not installed'}"
    )
    print(machine() + "\n")
    lines = []
    if args.only in (None, "memory"):
        lines += memory_table(args) + [""]
    if args.only in (None, "time"):
        lines += time_table(args) + [""]
    if args.only in (None, "filter"):
        lines += filter_table(args) + [""]
    if args.only in (None, "sweep"):
        lines += sweep_table(args) + [""]
    if args.only in (None, "matmuls"):
        lines += matmul_table(args)
    print(
        "\nratio: median of per-pair (sweep: per-round) time ratios, a/b timed back to back; "
        "spread: 10-90% range of jaxce/naive; MiB = 2**20 B"
    )
    return lines


if __name__ == "__main__":
    main()
