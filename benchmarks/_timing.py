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
