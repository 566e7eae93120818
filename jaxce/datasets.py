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
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "load_csv", "load_iris"]

#: float32's largest finite value plus half a unit in the last place, 2**128 - 2**103:
#: numbers at least this large round to infinity in float32, the dtype training uses.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103
#: Lines :class:`csv.Sniffer` reads to find the delimiter.
_SNIFF_LINES = 20


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
    return _parse(text, target="species", source="iris.csv")


def load_csv(
    path: str | os.PathLike,
    target: str,
    *,
    features: Sequence[str] | None = None,
    drop: Sequence[str] = (),
) -> Dataset:
    """Read a CSV file with a header line: numeric feature columns plus one label column.

    The feature columns are ``features`` in that order, or by default every column other
    than ``target`` and those in ``drop`` (an ID column, say). They must hold numbers that
    are finite in ``float32`` (magnitude below about ``3.4e38``). The delimiter, comma,
    semicolon or tab, is read off the first lines (:class:`csv.Sniffer`; comma when they do
    not tell). A UTF-8 byte-order mark, as Excel writes, is skipped. The labels may be
    strings or integers; the distinct values, sorted (numerically if all are integers),
    become ``class_names`` and are mapped to ``0 .. C-1``.

    Args:
      path: the CSV file.
      target: name of the label column.
      features: names of the feature columns, in order; default all but ``target`` and
        ``drop``.
      drop: names of columns that are not features; only without ``features``.

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: with a one-line message if the file is missing, empty, not UTF-8 text or
        not parsable as CSV, two columns share a name (the message names them), the target
        column or a column named in ``features`` or ``drop`` is absent (the message lists
        the columns present), a value is missing or a feature is not a number finite in
        ``float32`` (the message names the column and the file's line), a row has the wrong
        number of fields, there is no feature column, or the labels hold fewer than two
        classes.

    Examples:
      >>> import pathlib, tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = pathlib.Path(folder) / "pets.csv"
      ...     _ = path.write_text("id;weight;kind\\n1;4.5;cat\\n2;30;dog\\n")
      ...     data = load_csv(path, "kind", drop=["id"])
      >>> data.feature_names, data.class_names, data.features.tolist()
      (('weight',), ('cat', 'dog'), [[4.5], [30.0]])
    """
    path = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
        return _parse(text, target=target, features=features, drop=drop, source=path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a CSV file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: {e}") from None


def _delimiter(text: str) -> str:
    """Comma, semicolon or tab, whichever :class:`csv.Sniffer` finds in the first lines."""
    sample = "".join(text.splitlines(keepends=True)[:_SNIFF_LINES])
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t").delimiter
    except csv.Error:  # one column, or no consistent delimiter
        return ","


def _parse(
    text: str,
    *,
    target: str,
    source: str,
    features: Sequence[str] | None = None,
    drop: Sequence[str] = (),
) -> Dataset:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
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
    present = f"columns present: {', '.join(header)}"
    if target not in header:
        raise ValueError(f"{source}: no target column {target!r}; {present}")
    if features is not None and drop:
        raise ValueError(f"{source}: give the feature columns or the columns to drop, not both")
    for role, names in (("feature", features or ()), ("drop", drop)):
        unknown = [name for name in names if name not in header]
        if unknown:
            raise ValueError(
                f"{source}: no {role} column {', '.join(map(repr, unknown))}; {present}"
            )
    if features is None:
        features = [name for name in header if name != target and name not in drop]
    elif target in features:
        raise ValueError(f"{source}: target column {target!r} cannot also be a feature")
    elif len(set(features)) < len(features):
        raise ValueError(f"{source}: a feature column is named twice in {', '.join(features)}")
    if not features:
        raise ValueError(f"{source}: no feature columns besides target {target!r}")
    t = header.index(target)
    columns = [header.index(name) for name in features]

    rows, raw_labels = [], []
    for fields in reader:
        line = reader.line_num
        if not fields:  # blank line
            continue
        if len(fields) != len(header):
            raise ValueError(
                f"{source}: line {line} has {len(fields)} fields, the header has {len(header)}"
            )
        for i in (t, *columns):
            if not fields[i].strip():
                raise ValueError(f"{source}: column {header[i]!r} line {line}: missing value")
        values = []
        for i in columns:
            field = fields[i].strip()
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
                raise ValueError(f"{source}: column {header[i]!r} line {line}: {field!r} {problem}")
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
        feature_names=tuple(features),
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
