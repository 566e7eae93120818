"""Small tabular data sets for the training demo: bundled Iris and a user's CSV file.

Only the standard library's :mod:`csv` and NumPy are used, so loading data never needs
pandas or scikit-learn.
"""

import collections
import csv
import importlib.resources
import io
import math
import os
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "load_csv", "load_iris"]

#: float32's largest finite value plus half a unit in the last place, 2**128 - 2**103:
#: numbers at least this large round to infinity in float32, the dtype training uses.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


class Dataset(NamedTuple):
    """Features, integer labels and the names that go with them.

    Attributes:
      features: ``float32`` array of shape ``[n, d]``.
      labels: ``int32`` array of shape ``[n]`` with values in ``0 .. C-1``.
      feature_names: the ``d`` column names, in order.
      class_names: the ``C`` class names; label ``k`` means ``class_names[k]``.
    """

    features: np.ndarray
    labels: np.ndarray
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]


def load_iris() -> Dataset:
    """Fisher's Iris data: 150 flowers, 4 measurements in cm, 3 species of 50 each.

    The rows are the copy bundled with scikit-learn, extracted once into
    ``jaxce/data/iris.csv``.

    Returns:
      A :class:`Dataset` with features ``[150, 4]`` and class names
      ``("setosa", "versicolor", "virginica")``.

    Examples:
      >>> iris = load_iris()
      >>> iris.features.shape, iris.features.dtype, iris.labels.dtype
      ((150, 4), dtype('float32'), dtype('int32'))
      >>> iris.class_names
      ('setosa', 'versicolor', 'virginica')
      >>> iris.feature_names[2:]
      ('petal_length_cm', 'petal_width_cm')
    """
    resource = importlib.resources.files("jaxce").joinpath("data/iris.csv")
    text = resource.read_text(encoding="utf-8")
    return _parse(io.StringIO(text, newline=""), target="species", source="iris.csv")


def load_csv(path: str | os.PathLike, target: str) -> Dataset:
    """Read a CSV file with a header line: numeric feature columns plus one label column.

    Every column other than ``target`` is a feature and must hold numbers that are finite
    in ``float32`` (magnitude below about ``3.4e38``). A UTF-8 byte-order mark, as Excel
    writes, is skipped. The labels may be strings or integers; the distinct values, sorted
    (numerically if all are integers), become ``class_names`` and are mapped to ``0 .. C-1``.

    Args:
      path: the CSV file.
      target: name of the label column.

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: with a one-line message if the file is missing, empty, not UTF-8 text or
        not parsable as CSV, two columns share a name (the message names them), the target
        column is absent (the message lists the columns present), a feature is not a number
        finite in ``float32`` (the message names the column and the data row, counted from 1
        after the header), a row has the wrong number of fields, there is no feature column,
        or the labels hold fewer than two classes.
    """
    path = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return _parse(f, target=target, source=path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a CSV file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: {e}") from None


def _parse(lines: Iterable[str], *, target: str, source: str) -> Dataset:
    reader = csv.reader(lines)
    header = next(reader, None)
    if not header:
        raise ValueError(f"{source}: empty file, expected a header line")
    header = [name.strip() for name in header]
    duplicated = [name for name, count in collections.Counter(header).items() if count > 1]
    if duplicated:
        raise ValueError(
            f"{source}: duplicate column names {', '.join(map(repr, duplicated))}; "
            "every column needs its own name"
        )
    if target not in header:
        raise ValueError(
            f"{source}: no target column {target!r}; columns present: {', '.join(header)}"
        )
    t = header.index(target)
    feature_names = tuple(name for i, name in enumerate(header) if i != t)
    if not feature_names:
        raise ValueError(f"{source}: no feature columns besides target {target!r}")

    rows, raw_labels = [], []
    for r, fields in enumerate(reader, start=1):
        if not fields:  # blank line
            continue
        if len(fields) != len(header):
            raise ValueError(
                f"{source}: row {r} has {len(fields)} fields, the header has {len(header)}"
            )
        values = []
        for i, field in enumerate(fields):
            if i == t:
                continue
            try:
                value = float(field)
            except ValueError:
                value = math.nan
            if not abs(value) < _FLOAT32_OVERFLOW:
                problem = (
                    "overflows float32 (largest 3.4e38)"
                    if math.isfinite(value)
                    else "is not a finite number"
                )
                raise ValueError(
                    f"{source}: column {header[i]!r} row {r}: {field.strip()!r} {problem}"
                )
            values.append(value)
        rows.append(values)
        raw_labels.append(fields[t].strip())
    if not rows:
        raise ValueError(f"{source}: no data rows after the header")

    classes = sorted(set(raw_labels), key=_class_sort_key(raw_labels))
    if len(classes) < 2:
        raise ValueError(
            f"{source}: target column {target!r} has only one class ({classes[0]!r}); "
            "need at least two"
        )
    index = {name: k for k, name in enumerate(classes)}
    return Dataset(
        features=np.asarray(rows, dtype=np.float32),
        labels=np.asarray([index[name] for name in raw_labels], dtype=np.int32),
        feature_names=feature_names,
        class_names=tuple(classes),
    )


def _class_sort_key(labels: list[str]):
    """Sort integer-looking labels numerically ("2" before "10"), anything else as text."""
    try:
        for label in set(labels):
            int(label)
    except ValueError:
        return str
    return int
