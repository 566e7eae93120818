import numpy as np
import pytest

from jaxce.datasets import Dataset, load_csv, load_iris


def test_load_iris_shapes_dtypes_and_classes():
    iris = load_iris()
    assert isinstance(iris, Dataset)
    assert iris.features.shape == (150, 4) and iris.features.dtype == np.float32
    assert iris.labels.shape == (150,) and iris.labels.dtype == np.int32
    assert iris.class_names == ("setosa", "versicolor", "virginica")
    assert iris.feature_names == (
        "sepal_length_cm",
        "sepal_width_cm",
        "petal_length_cm",
        "petal_width_cm",
    )
    np.testing.assert_array_equal(np.bincount(iris.labels), [50, 50, 50])
    # First row of Fisher's table, and the measurements' known ranges.
    np.testing.assert_allclose(iris.features[0], [5.1, 3.5, 1.4, 0.2], rtol=1e-6)
    assert iris.labels[0] == 0
    np.testing.assert_allclose(iris.features.min(axis=0), [4.3, 2.0, 1.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(iris.features.max(axis=0), [7.9, 4.4, 6.9, 2.5], rtol=1e-6)


def _write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_csv_string_labels_sorted_and_target_anywhere(tmp_path):
    path = _write(tmp_path, "a, label ,b\n1,dog,2\n3, cat,4\n5,dog,6.5\n\n")
    data = load_csv(path, "label")
    assert data.feature_names == ("a", "b")
    assert data.class_names == ("cat", "dog")
    np.testing.assert_array_equal(data.labels, [1, 0, 1])
    np.testing.assert_array_equal(data.features, [[1, 2], [3, 4], [5, 6.5]])
    assert data.features.dtype == np.float32 and data.labels.dtype == np.int32


def test_load_csv_integer_labels_sorted_numerically(tmp_path):
    data = load_csv(_write(tmp_path, "x,y\n0,10\n1,2\n2,2\n3,9\n"), "y")
    assert data.class_names == ("2", "9", "10")
    np.testing.assert_array_equal(data.labels, [2, 0, 0, 1])


@pytest.mark.parametrize(
    "text, message",
    [
        ("a,b,label\n1,2,x\n3,4,y\n", "no target column 'target'; columns present: a, b, label"),
        ("a,target\n1,x\nfoo,y\n", "column 'a' row 2: 'foo' is not a finite number"),
        ("a,b,target\n1,2,x\n3,nan,y\n", "column 'b' row 2: 'nan' is not a finite number"),
        ("a,b,target\n1,,x\n3,4,y\n", "column 'b' row 1: '' is not a finite number"),
        ("a,b,target\n1,inf,x\n3,4,y\n", "column 'b' row 1: 'inf' is not a finite number"),
        ("a,target\n1,x\n2,x\n", "target column 'target' has only one class ('x')"),
        ("a,target\n1,x\n2,y,3\n", "row 2 has 3 fields, the header has 2"),
        ("", "empty file"),
        ("a,target\n", "no data rows"),
        ("target\nx\ny\n", "no feature columns"),
    ],
)
def test_load_csv_errors(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_csv(path, "target")
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_csv_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.csv: no such file"):
        load_csv(tmp_path / "nope.csv", "target")
    with pytest.raises(ValueError, match="is a directory"):
        load_csv(tmp_path, "target")
