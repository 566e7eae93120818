"""Timing shared by the benchmark scripts: paired, alternating runs on a shared machine.

Alternating the two functions call by call (and flipping the order every pair) makes both see
the same machine load, so their per-pair ratio is stable even when absolute times drift.
"""

import time

import jax
import numpy as np


def paired_times(fa, fb, repeats, warmup):
    """Alternate the calls ``fa()`` and ``fb()`` (order flipped every pair); times in seconds."""
    for _ in range(warmup):
        jax.block_until_ready(fa())
        jax.block_until_ready(fb())
    ta, tb = [], []
    for i in range(repeats):
        order = ((fa, ta), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fa, ta))
        for f, out in order:
            start = time.perf_counter()
            jax.block_until_ready(f())
            out.append(time.perf_counter() - start)
    return np.array(ta), np.array(tb)
