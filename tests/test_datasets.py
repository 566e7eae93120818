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
        ("a,target\n1,x\nfoo,y\n", "column 'a' line 3: 'foo' is not a finite number"),
        ("a,b,target\n1,2,x\n3,nan,y\n", "column 'b' line 3: 'nan' is not a finite number"),
        # The file's line numbers, past blank lines; an empty cell is a missing value.
        ("a,b,target\n1,2,x\n\n3,4,y\n1, ,x\n", "column 'b' line 5: missing value"),
        ("a,b,target\n1,2,x\n3,4,\n", "column 'target' line 3: missing value"),
        ("a,b,target\n1,inf,x\n3,4,y\n", "column 'b' line 2: 'inf' is not a finite number"),
        # Finite in float64, infinite in the float32 that training uses.
        ("a,b,target\n1,2,x\n3,1e39,y\n", "column 'b' line 3: '1e39' overflows float32"),
        ("a,target\n-3.4028236e38,x\n3,y\n", "column 'a' line 2: '-3.4028236e38' overflows"),
        ("a,target,b,target\n1,x,2,y\n", "duplicate column names 'target'"),
        ("a,b,a,target,b\n1,2,3,x,4\n", "duplicate column names 'a', 'b'; every column"),
        ("a,target\n1,x\n2,x\n", "target column 'target' has only one class ('x')"),
        ("a,target\n1,x\n2,y,3\n", "line 3 has 3 fields, the header has 2"),
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


@pytest.mark.parametrize("delimiter", [";", "\t", ","])
def test_load_csv_sniffs_the_delimiter(tmp_path, delimiter):
    # A semicolon file read as commas had one column, "f1;f2;species": no target column.
    rows = ["f1,f2,species", "1.5,2,x", "3,4.25,y", "5,6,x"]
    path = _write(tmp_path, "\n".join(row.replace(",", delimiter) for row in rows) + "\n")
    data = load_csv(path, "species")
    assert data.feature_names == ("f1", "f2") and data.class_names == ("x", "y")
    np.testing.assert_array_equal(data.features, [[1.5, 2], [3, 4.25], [5, 6]])


def test_load_csv_choose_or_drop_columns(tmp_path):
    path = _write(tmp_path, "id,a,label,b\n101,1,x,2\n102,3,y,4\n")
    everything = load_csv(path, "label")
    assert everything.feature_names == ("id", "a", "b")  # an ID is a feature unless dropped
    dropped = load_csv(path, "label", drop=["id"])
    assert dropped.feature_names == ("a", "b")
    np.testing.assert_array_equal(dropped.features, [[1, 2], [3, 4]])
    chosen = load_csv(path, "label", features=["b", "a"])
    assert chosen.feature_names == ("b", "a")
    np.testing.assert_array_equal(chosen.features, [[2, 1], [4, 3]])
    # A non-numeric column that is not used is not read as a number.
    notes = _write(tmp_path, "note,a,label\nhi,1,x\n,2,y\n", name="notes.csv")
    assert load_csv(notes, "label", drop=["note"]).features.tolist() == [[1], [2]]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(drop=["ID", "id"]), "no drop column 'ID'; columns present: id, a, label"),
        (dict(features=["a", "c", "d"]), "no feature column 'c', 'd'; columns present: id, a,"),
        (dict(features=["a"], drop=["id"]), "give the feature columns or the columns to drop"),
        (dict(features=["a", "label"]), "target column 'label' cannot also be a feature"),
        (dict(features=["a", "a"]), "a feature column is named twice in a, a"),
        (dict(features=[]), "no feature columns besides target 'label'"),
        (dict(drop=["id", "a"]), "no feature columns besides target 'label'"),
    ],
)
def test_load_csv_column_choice_errors(tmp_path, options, message):
    path = _write(tmp_path, "id,a,label\n1,2,x\n3,4,y\n")
    with pytest.raises(ValueError) as info:
        load_csv(path, "label", **options)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)
