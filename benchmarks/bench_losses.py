"""Benchmark jaxce's softmax cross-entropies against optax, side by side in one run.

For each case it compiles ``jax.jit(jax.value_and_grad(mean loss))`` (gradient in the logits)
for both implementations and reports

- the median wall time of one call (``block_until_ready``; warm-up calls excluded), measured
  in *pairs*: the two functions run alternately, so load drift on a shared machine hits both
  alike; ``ratio`` is the median of the per-pair ratios and ``spread`` their 10-90% range;
- ``temp_size_in_bytes`` of ``jax.jit(f).lower(...).compile().memory_analysis()``: the scratch
  memory XLA allocates besides the arguments and outputs.

Rows (issue 2, "Benchmark"; issue 4, "Tests"), N=4096 examples, V=32768 classes:

- integer labels, float32 and bfloat16: jaxce vs optax; target time <= 1.0x (bf16 <= 0.8x);
- soft labels, float32 and bfloat16: jaxce vs optax; target time <= 0.8x in float32 (issue 11:
  writing the fresh [N, V] gradient's pages is a floor both pay) and <= 0.7x in bfloat16, temp
  memory 0 in float32 and <= 0.5x optax's in bfloat16;
- integer labels with ``label_smoothing=0.1, z_loss=1e-4, ignore_index=-100`` (1/8 of the labels
  ignored) vs plain jaxce: target time <= 1.1x and no extra temp memory.

Memory targets are read as [N, V]-sized scratch: a few O(N) row vectors (16 KiB each at
N=4096, the per-example statistics the losses return or keep for the backward pass) are
allowed on top (``ROW_SLACK``). temp_size_in_bytes also counts the scratch of branches that
did not run (the exact sums for rows with -inf logits, computed in row blocks).

Usage::

    python benchmarks/bench_losses.py            # N=4096, V=32768 (a few minutes on 2 cores)
    python benchmarks/bench_losses.py --quick    # N=256: a smoke run
    python benchmarks/bench_losses.py --memory   # temp memory of every option combination
"""

import argparse
import itertools
import shlex
import statistics
import sys

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import optax

import jaxce
from _timing import machine, paired_times  # benchmarks/_timing.py (the script's folder)

IGNORE = -100
MIB = 2**20
ROW_SLACK = MIB  # O(N) row vectors, not [N, V] scratch (see the module docstring)


def mean_loss(name, options=None):
    """The scalar ``f(logits, labels)`` of one implementation."""
    options = options or {}
    if name == "jaxce-int":
        return lambda z, y: jaxce.softmax_cross_entropy_with_integer_labels(
            z, y, reduction="mean", **options
        )
    if name == "optax-int":
        return lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
    if name == "jaxce-soft":
        return lambda z, y: jaxce.softmax_cross_entropy(z, y, reduction="mean", **options)
    if name == "optax-soft":
        return lambda z, y: optax.softmax_cross_entropy(z, y).mean()
    raise ValueError(name)


def compile_step(loss, *args):
    """``jit(value_and_grad(loss))`` compiled for these arguments, and its temp bytes."""
    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(*args).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def make_inputs(n, v, dtype, soft, seed=0):
    kz, ky = jax.random.split(jax.random.key(seed))
    z = (3.0 * jax.random.normal(kz, (n, v), jnp.float32)).astype(dtype)
    if soft:
        y = jax.nn.softmax(jax.random.normal(ky, (n, v), jnp.float32), axis=-1).astype(dtype)
    else:
        y = jax.random.randint(ky, (n,), 0, v, jnp.int32)
    return z, y


def with_ignored(y):
    """Integer labels with every 8th example set to ``ignore_index``."""
    return jnp.where(jnp.arange(y.shape[0]) % 8 == 3, IGNORE, y)


def fmt_bytes(b):
    return f"{b / MIB:.1f}" if b >= MIB or b == 0 else f"{b / MIB:.4f}"


def fmt_ratio(num, den):
    if den == 0:
        return "-" if num == 0 else "inf"
    return f"{num / den:.2f}"


def option_memory(n, v):
    """temp_size_in_bytes of jit(value_and_grad(mean loss)) for each combination of the
    options that select logits (where, softcap) with label smoothing, against the [N, V]
    float32 array (README, "Performance")."""
    print(f"temp memory of jit(value_and_grad), N={n} V={v}; the [N, V] float32 array is "
          f"{fmt_bytes(4 * n * v)} MiB; backend {jax.default_backend()}")
    header = f"{'labels':<8}{'dtype':<10}{'where':<8}{'softcap':<9}{'smoothing':<11}{'MiB':>9}"
    lines = [header, "-" * len(header)]
    print(*lines, sep="\n", flush=True)
    # The masks are arguments: a mask known at compile time (say jnp.ones closed over) is
    # folded away by XLA, and the table would not show what a user's mask costs.
    masks = {"class": jnp.ones(v, bool), "example": jnp.ones(n, bool), None: None}
    for soft, dtype in itertools.product((False, True), (jnp.float32, jnp.bfloat16)):
        z, y = make_inputs(n, v, dtype, soft)
        for where, cap, eps in itertools.product(masks, (None, 30.0), (0.0, 0.1)):
            options = dict(logit_softcap=cap, label_smoothing=eps)
            name = "jaxce-soft" if soft else "jaxce-int"
            loss = lambda z, y, m, name=name, options=options: mean_loss(
                name, dict(options, where=m)
            )(z, y)
            _, temp = compile_step(loss, z, y, masks[where])
            line = (f"{'soft' if soft else 'int':<8}{jnp.dtype(dtype).name:<10}{str(where):<8}"
                    f"{str(cap):<9}{eps:<11}{fmt_bytes(temp):>9}")
            lines.append(line)
            print(line, flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=256 and fewer repeats (smoke run)")
    parser.add_argument("--n", type=int, default=None, help="examples (default 4096; 256 with --quick)")
    parser.add_argument("--v", type=int, default=32768, help="classes (default 32768)")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs per row (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each function")
    parser.add_argument(
        "--only", default=None, metavar="TEXT",
        help="run only rows whose name contains TEXT. Rows: int f32, int bf16, soft f32, "
        "soft bf16, int+opts f32, int+opts bf16; spaces pad the names, so give one word: "
        "int (also matches int+opts), soft, opts, f32 or bf16",
    )
    parser.add_argument(
        "--memory", action="store_true",
        help="instead: temp memory of every option combination (compiles only; default N=1024, V=8192)",
    )
    args = parser.parse_args(argv)
    if args.memory:
        return option_memory(args.n or 1024, args.v if args.v != 32768 else 8192)
    n = args.n or (256 if args.quick else 4096)
    v = args.v
    repeats = args.repeats or (5 if args.quick else 9)

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, optax {optax.__version__}, "
        f"jaxce {jaxce.__version__} ({jaxce.__file__}); backend {jax.default_backend()} "
        f"({jax.device_count()} x {jax.devices()[0].device_kind}); N={n} V={v}; "
        f"{repeats} timed pairs after {args.warmup} warm-up calls each"
    )
    print(machine())
    print()

    smooth = dict(label_smoothing=0.1, z_loss=1e-4, ignore_index=IGNORE)
    # (row name, dtype, soft labels?, implementation A, options of A, implementation B, target)
    rows = [
        ("int   f32", jnp.float32, False, "jaxce-int", None, "optax-int", "time<=1.0x"),
        ("int   bf16", jnp.bfloat16, False, "jaxce-int", None, "optax-int", "time<=0.8x"),
        ("soft  f32", jnp.float32, True, "jaxce-soft", None, "optax-soft", "time<=0.8x, temp=0"),
        ("soft  bf16", jnp.bfloat16, True, "jaxce-soft", None, "optax-soft", "time<=0.7x, temp<=0.5x"),
        ("int+opts f32", jnp.float32, False, "jaxce-int", smooth, "jaxce-int", "time<=1.1x, temp<=1x"),
        ("int+opts bf16", jnp.bfloat16, False, "jaxce-int", smooth, "jaxce-int", "time<=1.1x, temp<=1x"),
    ]
    if args.only:
        rows = [r for r in rows if args.only in r[0]]

    header = (
        f"{'case':<14}{'A':>12}{'B':>12}{'A ms':>9}{'B ms':>9}{'ratio':>7}{'spread':>13}"
        f"{'A MiB':>9}{'B MiB':>9}{'temp':>9}  {'target':<24}{'met'}"
    )
    lines = [header, "-" * len(header)]
    print(header, flush=True)
    print("-" * len(header), flush=True)
    for name, dtype, soft, impl_a, opts_a, impl_b, target in rows:
        z, y = make_inputs(n, v, dtype, soft)
        ya = with_ignored(y) if opts_a and "ignore_index" in opts_a else y
        fa, temp_a = compile_step(mean_loss(impl_a, opts_a), z, ya)
        fb, temp_b = compile_step(mean_loss(impl_b), z, y)
        # The ignored labels only enter A; B sees the plain labels.
        ta, tb = paired_times(lambda: fa(z, ya), lambda: fb(z, y), repeats, args.warmup)
        ratios = ta / tb
        lo, hi = np.percentile(ratios, [10, 90])
        ratio = float(np.median(ratios))
        time_limit = float(target.split("<=")[1].split("x")[0])
        temp_ok = True
        if "temp=0" in target:
            temp_ok = temp_a <= ROW_SLACK
        elif "temp<=" in target:
            temp_limit = float(target.split("temp<=")[1].split("x")[0])
            temp_ok = temp_a <= temp_limit * temp_b + ROW_SLACK
        met = "yes" if ratio <= time_limit and temp_ok else "NO"
        label_a = impl_a.split("-")[0] + ("+opts" if opts_a else "")
        line = (
            f"{name:<14}{label_a:>12}{impl_b.split('-')[0]:>12}"
            f"{1e3 * statistics.median(ta):9.1f}{1e3 * statistics.median(tb):9.1f}"
            f"{ratio:7.2f}{f'{lo:.2f}-{hi:.2f}':>13}"
            f"{fmt_bytes(temp_a):>9}{fmt_bytes(temp_b):>9}{fmt_ratio(temp_a, temp_b):>9}  "
            f"{target:<24}{met}"
        )
        lines.append(line)
        print(line, flush=True)
        del fa, fb, z, y, ya
    print()
    print(
        "ratio: median of per-pair time ratios A/B (spread: their 10-90% range); "
        "temp: temp_size_in_bytes A/B; MiB = 2**20 bytes."
    )
    print(f"int+opts: label_smoothing=0.1, z_loss=1e-4, ignore_index={IGNORE} on 1/8 of the labels.")
    return lines


if __name__ == "__main__":
    main()
