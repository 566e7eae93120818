import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import optax
import pytest

import jaxce
from jaxce import _regression, train
from jaxce.datasets import load_iris


@pytest.fixture(scope="module")
def iris_split():
    """The default run's data: stratified 70/30 split, standardised with train statistics."""
    iris = load_iris()
    tr, te = train.split_stratified(iris.labels, test_fraction=0.3, seed=0)
    x_train, mean, std = train.standardize(iris.features[tr])
    x_test, _, _ = train.standardize(iris.features[te], mean=mean, std=std)
    return x_train, iris.labels[tr], x_test, iris.labels[te], iris.class_names


def _accuracy(params, x, y):
    return float(np.mean(train.predict(params, x) == y))


def test_default_cli_run_reaches_bar(capsys):
    status = train.main([])
    out, err = capsys.readouterr()
    assert status == 0, out + err
    accuracy = float(re.search(r"test accuracy (\d\.\d+) >= 0.93: OK", out).group(1))
    assert accuracy >= train.IRIS_ACCURACY_BAR
    assert "setosa" in out and "steps/s" in out and "JAX backend" in out
    assert "nats" in err and "bits" in err  # the progress bar


def test_fit_softmax_api(iris_split):
    x_train, y_train, x_test, y_test, _ = iris_split
    params, history = train.fit(x_train, y_train, steps=500, eval_set=(x_test, y_test))
    assert params["w"].shape == (4, 3) and params["b"].shape == (3,)
    assert history.loss.shape == history.accuracy.shape == history.eval_loss.shape == (500,)
    assert history.loss[-1] < 0.1 < np.log(3) - 0.05 < history.loss[0]
    assert history.final_loss <= history.loss[-1]
    assert _accuracy(params, x_test, y_test) >= 0.93
    assert history.eval_accuracy[-1] == pytest.approx(_accuracy(params, x_test, y_test))
    proba = np.asarray(train.predict_proba(params, x_test))
    assert proba.shape == (45, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("positive, bar", [("setosa", 1.0), ("virginica", 0.93)])
def test_logistic_one_vs_rest(iris_split, positive, bar):
    x_train, y_train, x_test, y_test, class_names = iris_split
    k = class_names.index(positive)
    yb_train, yb_test = (y_train == k).astype(np.int32), (y_test == k).astype(np.int32)
    params, history = train.fit(x_train, yb_train, model="logistic", steps=500)
    assert params["w"].shape == (4,) and params["b"].shape == ()
    assert _accuracy(params, x_test, yb_test) >= bar
    assert np.asarray(train.predict_proba(params, x_test)).shape == (45, 2)


def test_same_loss_curve_as_optax(iris_split):
    x_train, y_train = iris_split[:2]

    def optax_loss(logits, labels):
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    ours = train.fit(x_train, y_train, steps=300)
    theirs = train.fit(x_train, y_train, steps=300, loss_fn=optax_loss)
    np.testing.assert_allclose(ours.history.loss, theirs.history.loss, rtol=1e-5)
    np.testing.assert_allclose(ours.params["w"], theirs.params["w"], rtol=1e-4, atol=1e-5)


def test_same_loss_curve_as_optax_logistic(iris_split):
    x_train, y_train = iris_split[:2]
    y = (y_train == 2).astype(np.int32)

    def optax_loss(logits, labels):
        return optax.losses.sigmoid_binary_cross_entropy(logits, labels).mean()

    ours = train.fit(x_train, y, model="logistic", steps=300)
    theirs = train.fit(x_train, y, model="logistic", steps=300, loss_fn=optax_loss)
    np.testing.assert_allclose(ours.history.loss, theirs.history.loss, rtol=1e-5)


def test_chunks_that_overrun_steps_change_nothing(iris_split):
    # 7 steps in chunks of 3 runs 9 scanned steps; the last two must be no-ops.
    x_train, y_train = iris_split[:2]
    calls = []
    a = train.fit(x_train, y_train, steps=7, chunk_size=3, callback=lambda *c: calls.append(c))
    b = train.fit(x_train, y_train, steps=7, chunk_size=7)
    assert [c[0] for c in calls] == [3, 6, 7]
    assert len(a.history.loss) == 7
    np.testing.assert_allclose(a.history.loss, b.history.loss, rtol=1e-6)
    np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop", "adamw", "lbfgs"])
def test_other_optimizers(iris_split, optimizer):
    x_train, y_train, x_test, y_test, _ = iris_split
    steps = 50 if optimizer == "lbfgs" else 300
    params, history = train.fit(
        x_train, y_train, steps=steps, optimizer=optimizer, weight_decay=1e-3
    )
    assert np.all(np.isfinite(history.loss))
    assert _accuracy(params, x_test, y_test) >= 0.9


def test_split_and_standardize():
    labels = load_iris().labels
    tr, te = train.split_stratified(labels, test_fraction=0.3, seed=1)
    assert np.intersect1d(tr, te).size == 0 and len(tr) + len(te) == 150
    np.testing.assert_array_equal(np.bincount(labels[te]), [15, 15, 15])
    tr2, _ = train.split_stratified(labels, test_fraction=0.3, seed=1)
    tr3, _ = train.split_stratified(labels, test_fraction=0.3, seed=2)
    assert np.array_equal(tr, tr2) and not np.array_equal(tr, tr3)
    with pytest.raises(ValueError, match=r"test fraction must be in \(0, 1\)"):
        train.split_stratified(labels, test_fraction=1.0)
    z, mean, std = train.standardize(load_iris().features)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1, rtol=1e-5)


@pytest.mark.parametrize(
    "names", [["a", "bb", "c"], ["setosa", "versicolor", "virginica"], ["x", "a-long-name"]]
)
def test_confusion_matrix_table(names):
    k = len(names)
    labels, predicted = np.arange(4) % k, np.array([0, k - 1, k - 1, 0]) % k
    counts = train.confusion_matrix(labels, predicted, k)
    assert counts.sum() == 4 and np.trace(counts) == np.sum(labels == predicted)
    header, *rows = train.format_confusion_matrix(counts * 1000, names).splitlines()
    assert [row.split()[0] for row in rows] == names
    # Each column label's right edge sits over the right edge of its numbers.
    label_ends = [m.end() for m in re.finditer(r"\S+", header)]
    assert len(label_ends) == k
    for row, true_counts in zip(rows, counts * 1000, strict=True):
        number_ends = [m.end() for m in re.finditer(r"\S+", row)][1:]
        assert number_ends == label_ends
        assert [int(n) for n in row.split()[1:]] == true_counts.tolist()


def test_confusion_matrix_table_aligned_in_cli_output(capsys):
    assert train.main(["--steps", "50", "--min-accuracy", "0", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("confusion matrix on the test split (rows: true class, columns: predicted):")
    header, *rows = lines[at + 1 : at + 5]
    assert header == " " * 17 + "setosa versicolor  virginica"
    assert [row.index(" ", 2) for row in rows] == [8, 12, 11]  # after each class name
    for row in rows:
        assert [m.end() for m in re.finditer(r"\S+", row)][1:] == [23, 34, 45]
    assert [m.end() for m in re.finditer(r"\S+", header)] == [23, 34, 45]


def test_plain_progress_lines_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert train.main(["--steps", "40", "--min-accuracy", "0.5"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"^step 40/40: loss \d\.\d+ nats = \d\.\d+ bits, accuracy", err, re.M)


BAD_CSV = {
    "missing": None,
    "no_target": "a,b\n1,2\n",
    "text": "a,label\n1,x\nhello,y\n",
    "nan": "a,label\n1,x\nNaN,y\n",
    "one_class": "a,label\n1,x\n2,x\n",
    "float32": "a,label\n1,x\n1e39,y\n",
    "duplicate": "a,label,label\n1,x,y\n2,y,x\n",
    "continuous": "a,label\n1,0.5\n2,1.5\n3,2.5\n",
    "singleton": "a,label\n1,x\n2,x\n3,y\n4,y\n5,z\n",
    "semicolons": "f1;f2;species\n1;2;x\n3;4;y\n1;2;x\n3;4;y\n",
    "empty_cell": "f1,species\n1,x\n2,y\n3,x\n,y\n",
}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--csv", "{missing}", "--target", "label"], "no such file"),
        (["--csv", "{no_target}", "--target", "label"], "columns present: a, b"),
        (["--csv", "{text}", "--target", "label"], "column 'a' line 3: 'hello' is not a finite"),
        (["--csv", "{nan}", "--target", "label"], "column 'a' line 3: 'NaN' is not a finite"),
        (["--csv", "{one_class}", "--target", "label"], "has only one class ('x')"),
        (
            ["--csv", "{float32}", "--target", "label"],
            "column 'a' line 3: '1e39' overflows float32",
        ),
        (["--csv", "{duplicate}", "--target", "label"], "duplicate column names 'label'"),
        (["--csv", "{semicolons}", "--target", "label"], "columns present: f1, f2, species"),
        (["--csv", "{empty_cell}", "--target", "species"], "column 'f1' line 5: missing value"),
        (["--csv", "{text}", "--target", "label", "--drop", "b"], "no drop column 'b'; columns"),
        (["--csv", "{text}", "--target", "label", "--features", "a,c"], "no feature column 'c'"),
        (["--csv", "{text}", "--target", "label", "--features", "a,,b"], "empty column name"),
        (["--features", "a"], "--features and --drop apply only to --csv"),
        (["--drop", "a"], "--features and --drop apply only to --csv"),
        (
            ["--csv", "{text}", "--target", "label", "--features", "a", "--drop", "b"],
            "argument --drop: not allowed with argument --features",
        ),
        (
            ["--csv", "{continuous}", "--target", "label"],
            "target 'label' has 3 distinct values in 3 rows, 3 of them in one row only "
            "(0.5, 1.5, 2.5); a class needs two rows",
        ),
        (
            ["--csv", "{singleton}", "--target", "label"],
            "target 'label' has 3 distinct values in 5 rows, 1 of them in one row only (z)",
        ),
        (
            ["--model", "logistic", "--positive-class", "rose"],
            "unknown positive class 'rose'; classes: setosa, versicolor, virginica",
        ),
        (["--steps", "0"], "--steps must be positive, got 0"),
        (["--steps", "-5"], "--steps must be positive, got -5"),
        (["--steps", "1000000000000"], "--steps must be at most 1000000000 (an int32 counts"),
        (["--seed", "18446744073709551616"], "--seed must be in [0, 4294967296), got 1844"),
        (["--seed", "4294967296"], "--seed must be in [0, 4294967296), got 4294967296"),
        (["--seed", "-1"], "--seed must be in [0, 4294967296), got -1"),
        (["--learning-rate", "inf"], "--learning-rate must be positive and finite, got inf"),
        (["--learning-rate", "nan"], "--learning-rate must be positive and finite, got nan"),
        (["--weight-decay", "inf"], "--weight-decay must be >= 0 and finite, got inf"),
        (["--weight-decay", "nan"], "--weight-decay must be >= 0 and finite, got nan"),
        (["--min-accuracy", "nan"], "--min-accuracy must be in [0, 1], got nan"),
        (["--min-accuracy", "1.5"], "--min-accuracy must be in [0, 1], got 1.5"),
        (["--test-fraction", "0"], "--test-fraction must be in (0, 1), got 0.0"),
        (["--test-fraction", "1.5"], "--test-fraction must be in (0, 1), got 1.5"),
        (["--csv", "{text}"], "--csv PATH and --target COLUMN go together"),
        (["--positive-class", "setosa"], "--positive-class applies only to --model logistic"),
        (["--model", "tree"], "invalid choice: 'tree'"),
        (["--steps", "many"], "invalid int value: 'many'"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, argv, message):
    paths = {}
    for name, text in BAD_CSV.items():
        paths[name] = str(tmp_path / f"{name}.csv")
        if text is not None:
            (tmp_path / f"{name}.csv").write_text(text)
    status = train.main([arg.format(**paths) for arg in argv])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("jaxce-train: error: ")
    assert message in err
    assert "Traceback" not in err


def _assert_one_line_error(err, message):
    assert err.count("\n") == 1 and err.startswith("jaxce-train: error: "), err
    assert message in err


def test_features_near_float32_limit_train_finite(tmp_path, capsys):
    # Values of +-3e38 overflowed float32 sums in standardize: the loss was nan, exit 0.
    rows = [f"{3e38 if k % 2 else -3e38},{k % 2},{k}" for k in range(40)]
    (tmp_path / "big.csv").write_text("a,label,b\n" + "\n".join(rows) + "\n")
    argv = ["--csv", str(tmp_path / "big.csv"), "--target", "label", "--steps", "20"]
    status = train.main([*argv, "--no-progress", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert status == 0, out + err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert np.all(np.isfinite(metrics["history"]["loss"] + metrics["history"]["eval_loss"]))
    assert metrics["final_loss_nats"] < np.log(2)  # column a separates the classes
    assert metrics["test_accuracy"] == 1.0


def test_standardize_near_float32_limit():
    top = np.finfo(np.float32).max
    z, mean, std = train.standardize(np.array([[top, 1.0], [-top, 1.0]], np.float32))
    np.testing.assert_array_equal(z, [[1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_array_equal(mean, [0.0, 1.0])
    np.testing.assert_array_equal(std, [top, 1.0])
    assert z.dtype == mean.dtype == std.dtype == np.float32


def test_test_row_overflowing_float32_after_scaling(tmp_path, capsys):
    # Training rows with a tiny spread scale a large test value beyond float32.
    labels = np.arange(20) % 2
    _, test = train.split_stratified(labels, test_fraction=0.3, seed=0)
    a = np.where(np.arange(20) % 4 < 2, 0.0, 1e-30)
    a[test[2]] = 1e10
    rows = [f"{x:g},{y}" for x, y in zip(a, labels, strict=True)]
    (tmp_path / "far.csv").write_text("a,label\n" + "\n".join(rows) + "\n")
    status = train.main(["--csv", str(tmp_path / "far.csv"), "--target", "label"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    _assert_one_line_error(err, f"column 'a' row {test[2] + 1}: standardised with the training")
    assert "overflows float32" in err


def test_diverging_training_exit_2(capsys):
    argv = ["--optimizer", "sgd", "--weight-decay", "1e30", "--steps", "5", "--no-progress"]
    status = train.main(argv)
    out, err = capsys.readouterr()
    assert status == 2
    _assert_one_line_error(err, "training diverged to a final loss of nan; lower --learning-rate")
    assert "test accuracy" not in out


def test_largest_seed_and_fit_step_bound(capsys):
    argv = ["--seed", str(2**32 - 1), "--steps", "5", "--min-accuracy", "0", "--no-progress"]
    assert train.main(argv) == 0
    assert "seed 4294967295" in capsys.readouterr().out
    x, y = np.zeros((2, 1), np.float32), np.array([0, 1])
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000000000\], got 1000000001"):
        train.fit(x, y, steps=train.MAX_STEPS + 1)


_X = np.array([[-2.0], [-1.0], [1.0], [2.0]], np.float32)
_Y = np.array([0, 0, 1, 1])
_BAD_FIT = [
    (dict(chunk_size=-1), ValueError, r"chunk_size must be a positive int or None, got -1"),
    (dict(learning_rate=float("nan")), ValueError, r"learning_rate must be finite and > 0, got nan"),
    (dict(learning_rate=-0.1), ValueError, r"learning_rate must be finite and > 0, got -0.1"),
    (dict(weight_decay=-1.0), ValueError, r"weight_decay must be finite and >= 0, got -1.0"),
    (dict(labels=np.array([0, -1, 1, 1])), ValueError, r"labels must be 0 .. C-1 for softmax regression, got -1"),
    (dict(labels=np.array([0.0, 0.5, 1.0, 1.0])), TypeError, r"labels must be integers, got dtype float64"),
    (dict(labels=np.array([0, 2, 1, 1]), model="logistic"), ValueError, r"labels must be 0 or 1 for logistic regression, got 2"),
]


@pytest.mark.parametrize("kwargs, error, message", _BAD_FIT)
def test_fit_refuses_bad_arguments(kwargs, error, message):
    """Bad hyperparameters and labels raise before any step (they had run to NaN losses, a raw
    compiler error for chunk_size=-1, or truncated float labels to classes)."""
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels", _Y)
    with pytest.raises(error, match=message):
        train.fit(_X, labels, steps=5, **kwargs)


def test_predict_proba_refuses_a_model_that_does_not_match_the_params():
    params = train.fit(_X, _Y, steps=5, model="logistic").params
    with pytest.raises(ValueError, match="model='softmax', but params are logistic regression's"):
        train.predict_proba(params, _X, model="softmax")
    assert train.predict_proba(params, _X, model="logistic").shape == (4, 2)


def test_csv_with_byte_order_mark(tmp_path, capsys):
    # Excel's "CSV UTF-8" starts with a byte-order mark, which hid the first column's name.
    rows = [f"{'x' if k % 2 else 'z'},{k % 2 + 0.1 * k}" for k in range(20)]
    (tmp_path / "excel.csv").write_bytes(("y,a\n" + "\n".join(rows)).encode("utf-8-sig"))
    argv = ["--csv", str(tmp_path / "excel.csv"), "--target", "y", "--steps", "5"]
    status = train.main([*argv, "--min-accuracy", "0", "--no-progress"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "20 rows, 1 features, classes x, z" in out


@pytest.mark.parametrize("write", [True, False])
def test_many_classes_summarised(tmp_path, capsys, write):
    # 300 classes printed every name on one line and a 300 x 300 table (half a megabyte).
    rows = [f"{k % 7},{k % 5},c{k % 300:03d}" for k in range(900)]
    (tmp_path / "many.csv").write_text("a,b,label\n" + "\n".join(rows) + "\n")
    out_dir = tmp_path / "out"
    argv = ["--csv", str(tmp_path / "many.csv"), "--target", "label", "--steps", "2"]
    argv += ["--no-progress"] + (["--out", str(out_dir)] if write else [])
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "classes c000, c001, c002, c003, c004, ... (300 in all)\n" in out
    where = "it is written" if write else "--out DIR writes it"
    table = f"confusion matrix on the test split: 300 x 300, too large to print; {where}"
    assert f"{table} to metrics.json\n" in out
    assert len(out) < 1500 and "c005" not in out
    if write:
        counts = np.array(json.loads((out_dir / "metrics.json").read_text())["confusion_matrix"])
        assert counts.shape == (300, 300) and counts.sum() == 300


def test_end_to_end_subprocess_on_csv(tmp_path):
    rng = np.random.default_rng(0)
    centers = {"red": (0.0, 0.0, 0.0), "green": (4.0, 0.0, 1.0), "blue": (0.0, 4.0, -1.0)}
    lines = ["f1,label,f2,f3"]
    for name, (a, b, c) in centers.items():
        for x in rng.normal(size=(40, 3)) + (a, b, c):
            lines.append(f"{x[0]:.4f},{name},{x[1]:.4f},{x[2]:.4f}")
    csv_path = tmp_path / "tmp.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    out_dir = tmp_path / "out"
    argv = ["--csv", str(csv_path), "--target", "label", "--steps", "50", "--out", str(out_dir)]
    proc = subprocess.run(
        [sys.executable, "-m", "jaxce.train", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pathlib.Path(__file__).resolve().parent.parent,  # finds jaxce even if not installed
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["class_names"] == ["blue", "green", "red"]
    assert metrics["feature_names"] == ["f1", "f2", "f3"]
    assert metrics["n_train"] + metrics["n_test"] == 120
    assert metrics["test_accuracy"] >= 0.9
    assert len(metrics["history"]["loss"]) == 50
    assert np.sum(metrics["confusion_matrix"]) == metrics["n_test"]
    with np.load(out_dir / "params.npz") as params:
        assert params["w"].shape == (3, 3) and params["mean"].shape == (3,)
        assert list(params["class_names"]) == ["blue", "green", "red"]
    assert (out_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- Newton-CG


def _flat(params):
    return np.concatenate([np.ravel(params["w"]), np.ravel(params["b"])])


def _reference_objective(x, y, model, l2, damping=0.0):
    """Plain float64 objective of the flat parameters (w raveled, then b), without jaxce."""
    import jax.numpy as jnp
    from jax.nn import log_softmax

    d = x.shape[1]

    def f(theta):
        if model == "softmax":
            c = theta.size // (d + 1)
            w, b = theta[: d * c].reshape(d, c), theta[d * c :]
            loss = -jnp.mean(jnp.take_along_axis(log_softmax(x @ w + b), y[:, None], 1))
        else:
            w, b = theta[:d], theta[d]
            z = x @ w + b
            loss = jnp.mean(jnp.logaddexp(0.0, z) - y * z)
        return loss + 0.5 * l2 * jnp.sum(w**2) + 0.5 * damping * jnp.sum(theta**2)

    return f


@pytest.mark.parametrize("model", ["softmax", "logistic"])
@pytest.mark.parametrize("l2, damping", [(0.0, 0.0), (0.3, 0.01)])
def test_newton_hvp_matches_float64_hessian(iris_split, model, l2, damping):
    import jax

    x, y = iris_split[0][:40], iris_split[1][:40]
    if model == "logistic":
        y = (y == 1).astype(np.int32)
    rng = np.random.default_rng(0)
    shape = (4, 3) if model == "softmax" else (4,)
    params = {"w": rng.normal(size=shape), "b": rng.normal(size=shape[1:])}
    v = {"w": rng.normal(size=shape), "b": rng.normal(size=shape[1:])}
    as32 = lambda t: {k: np.asarray(a, np.float32) for k, a in t.items()}  # noqa: E731
    params, v = as32(params), as32(v)
    hvp = jax.jit(lambda p, v: train.hessian_vector_product(p, x, l2, damping)(v))
    hv = _flat(hvp(params, v))
    with jax.enable_x64(True):  # jitted: op-by-op float64 dispatch is slow
        f = _reference_objective(np.float64(x), y, model, l2, damping)
        theta, v64 = np.float64(_flat(params)), np.float64(_flat(v))
        hessian = np.asarray(jax.jit(jax.hessian(f))(theta))
        jvp = jax.jit(lambda t, u: jax.jvp(jax.grad(f), (t,), (u,))[1])(theta, v64)
    np.testing.assert_allclose(hessian @ _flat(v), np.asarray(jvp), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hv, hessian @ _flat(v), rtol=2e-5, atol=2e-6)
    assert np.abs(hessian @ _flat(v)).max() > 0.1  # a non-trivial product


def test_newton_cg_cli_beats_adam(iris_split, capsys):
    # Measured: newton-cg 10 steps loss 0.0241 nats, test accuracy 0.956; Adam 500 steps
    # loss 0.0412, test accuracy 0.956.
    status = train.main(["--optimizer", "newton-cg", "--no-progress"])
    out, err = capsys.readouterr()
    assert status == 0, out + err
    assert "newton-cg, step scale 1, damping 0.0001, weight decay 0, 10 steps" in out
    assert float(re.search(r"test accuracy (\d\.\d+) >= 0.93: OK", out).group(1)) >= 0.93
    newton_loss = float(re.search(r"final train loss (\d\.\d+) nats", out).group(1))
    x_train, y_train = iris_split[:2]
    adam = train.fit(x_train, y_train, steps=500)
    assert newton_loss <= adam.history.final_loss - 0.01


@pytest.mark.parametrize("model", ["softmax", "logistic"])
def test_newton_cg_reaches_float64_minimum(iris_split, model):
    # With an L2 penalty the minimum is unique; scipy's float64 BFGS gives the reference.
    import jax
    import scipy.optimize

    x, y = iris_split[:2]
    if model == "logistic":
        y = (y == 2).astype(np.int32)
    l2 = 1e-2
    with jax.enable_x64(True):
        f = jax.jit(jax.value_and_grad(_reference_objective(np.float64(x), y, model, l2)))
        size = 15 if model == "softmax" else 5
        ref = scipy.optimize.minimize(
            lambda t: tuple(map(np.asarray, f(t))), np.zeros(size), jac=True, method="BFGS",
            options={"gtol": 1e-10},
        )  # fmt: skip
        ref_loss = float(_reference_objective(np.float64(x), y, model, 0.0)(ref.x))
    params, history = train.fit(x, y, model=model, optimizer="newton-cg", weight_decay=l2)
    assert history.loss.shape == (train.DEFAULT_NEWTON_STEPS,)
    assert history.loss[0] == pytest.approx(np.log(3 if model == "softmax" else 2), abs=0.01)
    assert np.all(np.diff(history.loss[:5]) < 0)  # the first Newton steps lower the loss
    assert history.final_loss == pytest.approx(ref_loss, rel=1e-4)
    d = x.shape[1]
    ref_params = (
        {"w": ref.x[: 4 * 3].reshape(d, 3), "b": ref.x[12:]}
        if model == "softmax"
        else {"w": ref.x[:d], "b": ref.x[d]}
    )
    np.testing.assert_allclose(
        train.predict_proba(params, x), train.predict_proba(ref_params, x), atol=1e-4
    )


def test_newton_cg_uses_the_logits_hvp(iris_split, monkeypatch):
    import inspect

    import jax

    import jaxce

    calls = []
    original = jaxce.softmax_cross_entropy_hvp

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    def no_hessian(*args, **kwargs):
        raise AssertionError("train must not build the Hessian")

    monkeypatch.setattr(jaxce, "softmax_cross_entropy_hvp", counting)
    monkeypatch.setattr(jax, "hessian", no_hessian)
    x_train, y_train = iris_split[:2]
    _, history = train.fit(x_train, y_train, optimizer="newton-cg", steps=2)
    assert calls and set(calls) == {(105, 3)}
    assert history.loss[1] < history.loss[0]
    source = inspect.getsource(_regression)  # the models and their training
    assert "jaxce.softmax_cross_entropy_hvp(" in source
    assert "hessian(" not in source.replace("def hessian_vector_product(", "")


# ------------------------------------------------------------------------------- issue 12


def test_out_that_is_a_file_fails_before_loading_or_training(tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("not a directory")

    def no_work(*args, **kwargs):
        raise AssertionError("loaded data or trained before checking --out")

    monkeypatch.setattr(train, "load_iris", no_work)
    monkeypatch.setattr(train, "fit", no_work)
    status = train.main(["--out", str(taken), "--no-progress"])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    _assert_one_line_error(err, f"--out {taken}: exists and is not a directory")
    status = train.main(["--out", str(taken / "sub"), "--no-progress"])
    assert status == 2
    _assert_one_line_error(capsys.readouterr().err, f"--out {taken / 'sub'}: Not a directory")
    assert taken.read_text() == "not a directory"


def test_missing_matplotlib_hint_works_from_the_checkout(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    argv = ["--steps", "5", "--min-accuracy", "0", "--no-progress", "--out", str(tmp_path)]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert 'matplotlib not installed: no curves.png (pip install -e ".[demo]"' in out
    assert "jaxce[demo]" not in out.replace('".[demo]"', "")
    assert f"wrote metrics.json, params.npz to {tmp_path}" in out


def test_help_gives_every_flag_a_default(capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    actions = [a for a in train._parser()._actions if a.dest != "help"]
    assert len(actions) == 15
    for action in actions:
        assert action.help.endswith(")") and "(default: " in action.help, action.dest
        assert " ".join(action.help.split()) in text
    assert "needs --target" in text
    assert "(default: 0.0001 for lbfgs, 0 otherwise)" in text
    assert "line search for lbfgs" in text and "(default: adam)" in text


def test_help_parses_before_importing_jax(tmp_path):
    # The package loads its modules lazily and train.py imports JAX inside its functions:
    # the command line answers before JAX loads.
    code = f"""
import sys, jaxce, jaxce.train
assert jaxce.__file__ == {jaxce.__file__!r}, jaxce.__file__  # the package under test
args = jaxce.train._parser().parse_args(["--optimizer", "lbfgs", "--out", "x"])
jaxce.train._check_args(args)
loaded = sorted(m for m in ("jax", "jaxlib", "optax") if m in sys.modules)
assert not loaded, loaded
try:
    jaxce.train.main(["--help"])
except SystemExit as e:
    assert e.code == 0
loaded = sorted(m for m in ("jax", "jaxlib", "optax") if m in sys.modules)
assert not loaded, loaded
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "usage: jaxce-train" in proc.stdout and "--test-fraction" in proc.stdout


def test_lbfgs_default_keeps_test_loss_and_weights_bounded(iris_split, capsys):
    # Unpenalised, L-BFGS drove the train loss to 3e-9 nats and the weights' norm to 3000:
    # the test loss rose from 0.079 to 25.7 nats.
    x_train, y_train, x_test, y_test, _ = iris_split
    params, history = train.fit(x_train, y_train, optimizer="lbfgs", eval_set=(x_test, y_test))
    assert history.loss.shape == (train.DEFAULT_STEPS,)
    assert np.max(history.eval_loss[10:]) < 0.2
    assert 5 < np.linalg.norm(params["w"]) < 30
    assert history.final_loss > 0.01 and _accuracy(params, x_test, y_test) >= 0.93
    status = train.main(["--optimizer", "lbfgs", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "lbfgs, line search, weight decay 0.0001, 500 steps" in out
    # An explicit --weight-decay 0 still gives the unpenalised fit.
    bare = train.fit(x_train, y_train, optimizer="lbfgs", weight_decay=0.0, steps=60)
    assert bare.history.final_loss < 1e-6


def test_csv_choose_drop_and_sniffed_delimiter_in_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    lines = ["id;f1;species;f2"]
    for k in range(60):
        label = k % 2
        f1, f2 = rng.normal(size=2) + 3 * label
        lines.append(f"{1000 + k};{f1:.3f};{'ab'[label]};{f2:.3f}")
    path = tmp_path / "semi.csv"
    path.write_text("\n".join(lines) + "\n")
    base = ["--csv", str(path), "--target", "species", "--steps", "20", "--no-progress"]
    base += ["--min-accuracy", "0"]
    for extra, features in [
        ([], ["id", "f1", "f2"]),
        (["--drop", "id"], ["f1", "f2"]),
        (["--features", "f2, f1"], ["f2", "f1"]),
    ]:
        out_dir = tmp_path / f"out{len(extra)}{len(features)}"
        assert train.main([*base, *extra, "--out", str(out_dir)]) == 0
        assert f"60 rows, {len(features)} features, classes a, b" in capsys.readouterr().out
        metrics = json.loads((out_dir / "metrics.json").read_text())
        assert metrics["feature_names"] == features
