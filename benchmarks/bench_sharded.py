"""Benchmark the vocabulary-parallel jaxce loss against GSPMD's partitioning of the naive loss.

On a 2x4 mesh (data x model) of 8 devices, ``x [N, D]`` split over ``data``, ``w [D, V]`` over
``model``; each row compiles ``jax.jit(jax.value_and_grad(mean loss, (x, w)))`` and reports

- ``temp``: ``memory_analysis().temp_size_in_bytes`` of the compiled step, per device;
- ``comm``: the elements moved by all-gather / all-to-all / all-reduce / reduce-scatter /
  collective-permute in the compiled HLO, per device (the largest array of each collective);
- ``time``: the median wall time of one call, and its ratio to the GSPMD row, measured in
  interleaved rounds so that load drift hits every row alike.

Rows:

- ``gspmd optax``: ``optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()`` under
  plain ``jax.jit`` with ``NamedSharding`` inputs: XLA's automatic partitioning (GSPMD);
- ``jaxce vocab-parallel``: ``shard_map``, logits ``x @ w`` of the local V/4 columns, the jaxce
  loss with ``class_axis_name="model", batch_axis_name="data"``;
- ``jaxce fused vocab-parallel``: the same with ``jaxce.linear_softmax_cross_entropy`` (no
  [N, V/4] logits).

Without 8 accelerators the 8 devices are simulated on the CPU (XLA_FLAGS): they share the
machine's cores, so only the time *ratios* and the memory mean anything, not absolute times.

Usage::

    python benchmarks/bench_sharded.py            # N=2048, D=256, V=32768
    python benchmarks/bench_sharded.py --quick    # N=256, D=64, V=4096
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

import argparse  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxce  # noqa: E402

DATA, MODEL = "data", "model"
COLLECTIVE = re.compile(
    r"=\s+(\(.*?\)|\S+)\s+(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
    r"(?:-start)?\("
)
ARRAY = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def communicated(hlo: str) -> dict[str, int]:
    """Elements per collective kind (the largest array of each op), from compiled HLO text."""
    out: dict[str, int] = {}
    for m in COLLECTIVE.finditer(hlo):
        size = max(int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
                   for dims in ARRAY.findall(m.group(1)))
        out[m.group(2)] = out.get(m.group(2), 0) + size
    return out


def mesh_2x4():
    devices = jax.devices()
    if devices[0].platform == "cpu" or len(devices) < 8:
        devices = jax.devices("cpu")
    return Mesh(np.array(devices[:8]).reshape(2, 4), (DATA, MODEL))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    n, d, v = (256, 64, 4096) if args.quick else (2048, 256, 32768)
    mesh = mesh_2x4()
    xs, ws, ys = NamedSharding(mesh, P(DATA)), NamedSharding(mesh, P(None, MODEL)), NamedSharding(
        mesh, P(DATA))
    key_x, key_w, key_y = jax.random.split(jax.random.key(0), 3)
    x = jax.device_put(jax.random.normal(key_x, (n, d)), xs)
    w = jax.device_put(jax.random.normal(key_w, (d, v)) / np.sqrt(d), ws)
    y = jax.device_put(jax.random.randint(key_y, (n,), 0, v), ys)

    def gspmd(x, w, y):
        return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()

    def vocab_parallel(x, w, y):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            x @ w, y, reduction="mean", class_axis_name=MODEL, batch_axis_name=DATA)

    def fused(x, w, y):
        return jaxce.linear_softmax_cross_entropy(
            x, w, y, reduction="mean", class_axis_name=MODEL, batch_axis_name=DATA)

    shard = lambda f: jax.shard_map(f, mesh=mesh, in_specs=(P(DATA), P(None, MODEL), P(DATA)),
                                    out_specs=P())
    rows = {"gspmd optax (x @ w)": gspmd, "jaxce vocab-parallel": shard(vocab_parallel),
            "jaxce fused vocab-parallel": shard(fused)}

    compiled, stats = {}, {}
    for name, f in rows.items():
        c = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(x, w, y).compile()
        compiled[name] = c
        stats[name] = (c.memory_analysis().temp_size_in_bytes, communicated(c.as_text()))
        jax.block_until_ready(c(x, w, y))  # warm up
    times = {name: [] for name in rows}
    for _ in range(args.rounds):  # interleaved: drift on a shared machine hits all rows alike
        for name, c in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(x, w, y))
            times[name].append(time.perf_counter() - t0)

    platform = mesh.devices.flat[0].platform
    print(f"N={n} D={d} V={v}, mesh data=2 x model=4 on 8 {platform} devices"
          + (" (simulated on the CPU: they share its cores; read ratios and memory, not times)"
             if platform == "cpu" else ""))
    print(f"per-device logits slice [N/2, V/4] float32: {n * v // 8 * 4 / 2**20:.2f} MiB")
    base = statistics.median(times["gspmd optax (x @ w)"])
    print(f"{'':28s} {'time ms':>8s} {'ratio':>6s} {'temp MiB/dev':>13s}  communication (elements)")
    for name in rows:
        t = statistics.median(times[name])
        temp, comm = stats[name]
        comm_s = ", ".join(f"{k} {val}" for k, val in sorted(comm.items())) or "none"
        print(f"{name:28s} {t * 1e3:8.1f} {t / base:6.2f} {temp / 2**20:13.2f}  {comm_s}")


if __name__ == "__main__":
    main()
