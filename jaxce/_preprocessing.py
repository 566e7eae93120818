"""Features for the training demo: a stratified train/test split and standardisation.

NumPy only: nothing here loads JAX.
"""

import numpy as np

DEFAULT_TEST_FRACTION = 0.3


def split_stratified(
    labels: np.ndarray, *, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train/test split that keeps each class's share.

    Each class contributes ``round(test_fraction * count)`` shuffled rows to the test set,
    leaving at least one in the training set.

    Args:
      labels: ``[n]`` integer labels.
      test_fraction: share of each class held out, in (0, 1).
      seed: seed of the NumPy generator that shuffles.

    Returns:
      ``(train_index, test_index)``, sorted ``int64`` arrays partitioning ``range(n)``.

    Examples:
      >>> train, test = split_stratified(np.array([0, 0, 0, 0, 1, 1, 1, 1]), test_fraction=0.5)
      >>> len(train), len(test)
      (4, 4)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(round(test_fraction * len(rows)), len(rows) - 1)
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    test_index = np.sort(np.concatenate(test))
    if test_index.size == 0:
        raise ValueError(
            f"test fraction {test_fraction} leaves no test rows out of {labels.size}; raise it"
        )
    return np.sort(np.concatenate(train)), test_index


def standardize(
    features: np.ndarray, *, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale each column to zero mean and unit variance.

    Pass the ``mean`` and ``std`` returned for the training rows when scaling test rows, so
    no test statistic leaks into training. Constant columns get ``std = 1``. The arithmetic
    is in float64, so features near float32's limit (``3e38``) do not overflow; rows far
    outside the statistics' rows can still scale beyond float32 and come back as ``inf``.

    Returns:
      ``(scaled, mean, std)``, all ``float32``.

    Examples:
      >>> z, mean, std = standardize(np.array([[1.0, 5.0], [3.0, 5.0]]))
      >>> z.tolist(), mean.tolist(), std.tolist()
      ([[-1.0, 0.0], [1.0, 0.0]], [2.0, 5.0], [1.0, 1.0])
    """
    x = np.asarray(features, dtype=np.float64)
    mean = np.asarray(x.mean(axis=0) if mean is None else mean, np.float32)
    if std is None:
        std = np.asarray(x.std(axis=0), np.float32)
        std = np.where(std > 0, std, np.float32(1.0))
    std = np.asarray(std, np.float32)
    with np.errstate(over="ignore"):  # the inf the docstring promises
        return ((x - mean) / std).astype(np.float32), mean, std
