import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # sharded tests need 8 simulated CPU devices; must be set before JAX starts

# jax_numpy_rank_promotion="raise" is NOT set: the library broadcasts implicitly across ranks
# (softmax_jacobian's eye * p[..., None], the iota == labels[..., None] comparison and
# u * class_weights in _row_sums.py), which that option turns into errors.

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    """A fixed NumPy generator: every test draws the same numbers on every run."""
    return np.random.default_rng(0)
