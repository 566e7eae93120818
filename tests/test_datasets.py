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
        # Finite in float64, infinite in the float32 that training uses.
        ("a,b,target\n1,2,x\n3,1e39,y\n", "column 'b' row 2: '1e39' overflows float32"),
        ("a,target\n-3.4028236e38,x\n3,y\n", "column 'a' row 1: '-3.4028236e38' overflows"),
        ("a,target,b,target\n1,x,2,y\n", "duplicate column names 'target'"),
        ("a,b,a,target,b\n1,2,3,x,4\n", "duplicate column names 'a', 'b'; every column"),
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


def test_load_csv_float32_limit_is_accepted(tmp_path):
    # float32's largest value as NumPy prints it: float64 reads it a little above, and the
    # float32 rounding brings it back; one digit more is beyond and rounds to inf.
    data = load_csv(_write(tmp_path, "a,target\n3.4028235e38,x\n-3.4028235e38,y\n"), "target")
    top = np.finfo(np.float32).max
    np.testing.assert_array_equal(data.features[:, 0], [top, -top])


def test_load_csv_skips_utf8_byte_order_mark(tmp_path):
    # Excel's "CSV UTF-8" export starts with a byte-order mark.
    path = tmp_path / "excel.csv"
    path.write_bytes("y,a\nx,1\nz,2\n".encode("utf-8-sig"))
    data = load_csv(path, "y")
    assert data.feature_names == ("a",) and data.class_names == ("x", "z")


@pytest.mark.parametrize(
    "content, message",
    [
        ("y,a\nx,1\n".encode("utf-16"), "not UTF-8 text (invalid start byte)"),
        (b"a,y\n" + b"1" * 200_000 + b",x\n", "field larger than field limit"),
    ],
)
def test_load_csv_undecodable_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_csv(path, "y")
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_load_csv_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.csv: no such file"):
        load_csv(tmp_path / "nope.csv", "target")
    with pytest.raises(ValueError, match="is a directory"):
        load_csv(tmp_path, "target")
