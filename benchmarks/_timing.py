"""Helpers shared by the benchmark scripts: alternating timed runs, and what machine ran them.

Alternating the functions call by call (and rotating their order every round) makes all of them
see the same machine load, so their per-round ratios are stable even when absolute times drift.
"""

import os
import platform
import time

import jax
import numpy as np

VECTOR_FLAGS = ("avx", "amx", "fma")
"""Prefixes of the /proc/cpuinfo flags worth printing: AVX2, AVX-512, AMX, FMA."""


def rotated_times(fns, repeats, warmup):
    """Call each of ``fns`` in turn, the order rotated every round; one array of seconds each.

    Round ``i`` starts with ``fns[i % len(fns)]``: with two functions, the order flips every pair.
    """
    for _ in range(warmup):
        for f in fns:
            jax.block_until_ready(f())
    times = [[] for _ in fns]
    for i in range(repeats):
        first = i % len(fns)
        for j in [*range(first, len(fns)), *range(first)]:
            start = time.perf_counter()
            jax.block_until_ready(fns[j]())
            times[j].append(time.perf_counter() - start)
    return [np.array(t) for t in times]


def paired_times(fa, fb, repeats, warmup):
    """Alternate the calls ``fa()`` and ``fb()`` (order flipped every pair); times in seconds."""
    ta, tb = rotated_times((fa, fb), repeats, warmup)
    return ta, tb


def machine():
    """Two lines: the host CPU (model, cores, vector extensions) and the JAX devices.

    The CPU's model and its AVX/AMX/FMA flags come from /proc/cpuinfo where there is one (Linux
    on x86); elsewhere the model is ``platform.processor()`` and the flags are not listed.
    """
    model, flags = "", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and not model:
                    model = value
                elif key == "flags" and flags is None:
                    flags = [flag for flag in value.split() if flag.startswith(VECTOR_FLAGS)]
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    listed = " ".join(flags) if flags else "none listed (no x86 flags in /proc/cpuinfo)"
    device = jax.devices()[0]
    return (
        f"cpu: {model}, {cores} cores available; vector extensions: {listed}\n"
        f"devices: {jax.device_count()} x {device.device_kind} ({device.platform})"
    )


def rel_err(got, want) -> float:
    """The largest ``|got - want|`` relative to the largest ``|want|``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def compare_steps(ours, naive, shapes, inputs, repeats, warmup):
    """Side by side: two jitted steps returning ``(value, grads)``, on the same inputs.

    Returns a dict: ``temp_a``/``temp_b`` (``temp_size_in_bytes`` of the compiled steps,
    compiled for ``shapes``), ``ms_a``/``ms_b`` (median times), ``ratio`` (median of the
    per-pair ratios a/b, the calls alternated by :func:`paired_times`) with its 10-90%
    ``spread``, and ``errors``: :func:`rel_err` of the value and of each gradient (the first,
    untimed, calls' results).
    """
    temp = lambda f: f.lower(*shapes).compile().memory_analysis().temp_size_in_bytes
    fa, fb = (lambda: ours(*inputs)), (lambda: naive(*inputs))
    (value_a, grads_a), (value_b, grads_b) = jax.block_until_ready((fa(), fb()))
    ta, tb = paired_times(fa, fb, repeats, max(warmup - 1, 0))
    ratios = np.asarray(ta) / np.asarray(tb)
    return {
        "temp_a": temp(ours),
        "temp_b": temp(naive),
        "ms_a": 1e3 * float(np.median(ta)),
        "ms_b": 1e3 * float(np.median(tb)),
        "ratio": float(np.median(ratios)),
        "spread": tuple(np.percentile(ratios, [10, 90])),
        "errors": [rel_err(value_a, value_b)]
        + [rel_err(a, b) for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b))],
    }
