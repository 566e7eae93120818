"""Tests for the cross-entropy losses: REFERENCE.md sections 3-5, optax parity, the closed-form
p - y backward against autodiff of plain compositions, edge cases, bad input, and every option
of issue 4 against a float64 reference written from its documented formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special as sp
from _reference import reference  # tests/ is on sys.path (pytest's rootdir insertion)
from jax.test_util import check_grads

import jaxce

ce_soft = jaxce.softmax_cross_entropy
ce_int = jaxce.softmax_cross_entropy_with_integer_labels
bce = jaxce.sigmoid_binary_cross_entropy

F32 = dict(rtol=1e-5, atol=1e-6)
X210 = np.array([2.0, 1.0, 0.0], np.float32)
P210 = np.array([0.66524096, 0.24472847, 0.09003057])


def ln(base):
    return 1.0 if base is None else math.log(base)


def dirichlet(rng, shape):
    x = rng.gamma(1.0, size=shape)
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def f64(x):
    return np.asarray(x, np.float64)


# ------------------------------------------------------------------------------------------
# The float64 reference, from the documented formulas (PyTorch semantics for weights), written
# once for NumPy (values) and jax.numpy under x64 (gradients by plain autodiff).


def ref_ce(
    xp,
    z,
    labels,
    *,
    integer,
    mask=None,
    eps=0.0,
    cw=None,
    sw=None,
    zl=0.0,
    cap=None,
    ignore=None,
    reduction="none",
    base=None,
    sg=lambda a: a,
):
    """Cross-entropy of logits z [N, K] against labels [N] (integer) or [N, K] (soft).

    Targets t = w * m * ((1 - eps) y + eps / K_m); loss = -sum_k t_k log p_k + zl * lse^2;
    a row with no unmasked class or an ignored label has loss 0 and does not count; a label
    outside [0, K) gives NaN. "mean" divides by sum of (w[y_n] for integer labels with class
    weights, else 1) * sample weight over the counted rows (0 if nothing counts).
    """
    n, k = z.shape
    if cap is not None:
        z = cap * xp.tanh(z / cap)
    m = xp.ones((n, k), bool) if mask is None else xp.broadcast_to(xp.asarray(mask), (n, k))
    if integer:
        y = (xp.arange(k)[None, :] == labels[:, None]).astype(z.dtype)
    else:
        y = labels
    km = xp.sum(m, -1, keepdims=True)
    u = xp.where(m, (1 - eps) * y + eps / xp.maximum(km, 1), 0.0)
    t = u if cw is None else u * cw
    zm = xp.where(m, z, -xp.inf)
    peak = sg(xp.max(zm, -1, keepdims=True))
    peak = xp.where(xp.isfinite(peak), peak, 0.0)
    lse = xp.log(xp.sum(xp.where(m, xp.exp(xp.where(m, z, peak) - peak), 0.0), -1, keepdims=True))
    lse = lse + peak
    log_p = xp.where(m, z - lse, 0.0)
    loss = -xp.sum(t * log_p, -1) + zl * lse[:, 0] ** 2
    counted = km[:, 0] > 0
    norm = xp.ones(n, z.dtype)
    if integer:
        if ignore is not None:
            counted = counted & (labels != ignore)
        valid = (labels >= 0) & (labels < k)
        loss = xp.where(valid | ~counted, loss, xp.nan)
        if cw is not None:
            norm = cw[xp.clip(labels, 0, k - 1)]
    loss = xp.where(counted, loss, 0.0)
    if sw is not None:
        loss, norm = loss * sw, norm * sw
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = xp.sum(loss)
    else:
        den = xp.sum(xp.where(counted, norm, 0.0))
        out = xp.where(den > 0, xp.sum(loss) / xp.where(den > 0, den, 1.0), 0.0)
    return out / ln(base)


def np_ref(z, labels, **kw):
    with np.errstate(divide="ignore", invalid="ignore"):
        return ref_ce(np, f64(z), labels if kw.get("integer") else f64(labels), **kw)


def jnp_ref_grad(argnums, z, labels, **kw):
    """jax.grad of the float64 jax.numpy composition (sum of the output) at float64 inputs."""
    names = ("z", "labels", "cw", "sw")
    with jax.enable_x64(True):
        args = {"z": jnp.asarray(z, jnp.float64), "labels": jnp.asarray(labels)}
        if not kw.get("integer"):
            args["labels"] = args["labels"].astype(jnp.float64)
        for name in ("cw", "sw"):
            if kw.get(name) is not None:
                args[name] = jnp.asarray(kw.pop(name), jnp.float64)

        def f(*vals):
            a = dict(zip(names, vals))
            extra = {n: a[n] for n in ("cw", "sw") if n in a}
            return jnp.sum(
                ref_ce(jnp, a["z"], a["labels"], sg=jax.lax.stop_gradient, **extra, **kw)
            )

        vals = tuple(args.get(n) for n in names if n in args)
        grads = jax.grad(f, argnums)(*vals)
        return jax.tree_util.tree_map(lambda g: np.asarray(g, np.float64), grads)


# ------------------------------------------------------------------------------------------
# REFERENCE.md section 2 and 3: the notes' numbers


@pytest.mark.parametrize(
    "label,base,expected",
    [
        (0, None, 0.40760596),
        (0, 10, 0.17702102),
        (0, 2, 0.40760596 / math.log(2)),
        (1, None, 1.40760596),
        (1, 10, 1.40760596 / math.log(10)),
    ],
)
def test_reference_cross_entropy_numbers(label, base, expected):
    onehot = np.eye(3, dtype=np.float32)[label]
    np.testing.assert_allclose(ce_soft(X210, onehot, base=base), expected, rtol=1e-6)
    np.testing.assert_allclose(ce_int(X210, jnp.array(label), base=base), expected, rtol=1e-6)
    log_p = jaxce.log_softmax(X210)
    np.testing.assert_allclose(jaxce.nll_loss(log_p, jnp.array(label), base=base), expected, rtol=1e-6)


def test_reference_gradient_section_3():
    expected = [-0.33475904, 0.24472847, 0.09003057]
    y = jnp.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(jax.grad(ce_soft)(X210, y), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ce_int)(X210, jnp.array(0)), expected, rtol=1e-6)
    # Without the sum-to-one assumption: p * sum(y) - y.
    y2 = jnp.array([2.0, 0.5, 0.0])
    np.testing.assert_allclose(
        jax.grad(ce_soft)(X210, y2), P210 * 2.5 - np.array([2.0, 0.5, 0.0]), rtol=1e-6
    )


def test_reference_hessian_section_3():
    h = np.diag(P210) - np.outer(P210, P210)
    hessian = jax.jit(jax.hessian(ce_soft))
    for y in ([1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [2.0, 0.5, 0.0]):
        np.testing.assert_allclose(hessian(X210, jnp.array(y)), h * sum(y), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        jax.jit(jax.hessian(ce_int))(X210, jnp.array(2)), h, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        jax.jit(jax.hessian(lambda x: ce_int(x, jnp.array(2), base=2)))(X210),
        h / math.log(2),
        rtol=1e-5,
        atol=1e-7,
    )


# ------------------------------------------------------------------------------------------
# REFERENCE.md section 4: binary cross-entropy with a sigmoid, in bits


def logit(p):
    return np.float32(np.log(p / (1 - p)))


@pytest.mark.parametrize("o,expected", [(0.98, 0.02914635), (0.0001, 13.28771238)])
def test_reference_bce_bits(o, expected):
    z = jnp.array(logit(o))
    np.testing.assert_allclose(bce(z, jnp.array(1.0), base=2), expected, rtol=1e-5)
    np.testing.assert_allclose(bce(z, jnp.array(1.0)), expected * math.log(2), rtol=1e-5)
    # z = w x + b: de/dw = x (o - y) / ln b and de/db = (o - y) / ln b.
    x = 3.0
    b = 0.5
    w = (float(z) - b) / x
    gw, gb = jax.grad(lambda w, b: bce(w * x + b, jnp.array(1.0), base=2), (0, 1))(w, b)
    np.testing.assert_allclose(gw, x * (o - 1.0) / math.log(2), rtol=1e-4)
    np.testing.assert_allclose(gb, (o - 1.0) / math.log(2), rtol=1e-4)
    # The badly wrong prediction gets the large gradient (no slow learning).
    assert abs(float(gb)) > 0.9 / math.log(2) or o > 0.5


def test_reference_bce_multilabel_sum(rng):
    z = rng.normal(size=(4,)).astype(np.float32) * 3
    y = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    o = sp.expit(f64(z))
    ref = -(y * np.log(o) + (1 - y) * np.log1p(-o)).sum()
    np.testing.assert_allclose(bce(z, y, reduction="sum"), ref, rtol=1e-5)
    np.testing.assert_allclose(bce(z, y, reduction="sum", base=10), ref / math.log(10), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda z: bce(z, y).sum())(z), o - y, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# REFERENCE.md section 5: softmax with log-likelihood


def test_reference_nll_bits():
    log_p = jnp.log(jnp.array([[0.0508, 0.9492], [0.8360, 0.1640]]))
    out = jaxce.nll_loss(log_p, jnp.array([0, 0]), base=2)
    np.testing.assert_allclose(out, [4.29902769, 0.25842515], rtol=1e-6)
    assert float(out[0]) > float(out[1])  # wrong class: large loss


def test_reference_batch_loss_forms(rng):
    z = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=6)
    log_p = sp.log_softmax(f64(z), -1)
    ref = -log_p[np.arange(6), y].mean()
    onehot = np.eye(4, dtype=np.float32)[y]
    np.testing.assert_allclose(ce_int(z, y, reduction="mean"), ref, rtol=1e-6)
    np.testing.assert_allclose(ce_soft(z, onehot, reduction="mean"), ref, rtol=1e-6)
    np.testing.assert_allclose(
        jaxce.nll_loss(jaxce.log_softmax(z), y, reduction="mean"), ref, rtol=1e-6
    )
    np.testing.assert_allclose(
        (onehot * -jnp.log(jaxce.softmax(z))).sum(1).mean(), ref, rtol=1e-6
    )


# ------------------------------------------------------------------------------------------
# Parity with optax on ordinary inputs


def test_optax_parity_soft(rng):
    z = rng.normal(size=(4, 5)).astype(np.float32) * 2
    y = dirichlet(rng, (4, 5))
    np.testing.assert_allclose(ce_soft(z, y), optax.softmax_cross_entropy(z, y), **F32)
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda z: ce_soft(z, y).sum()))(z),
        jax.jit(jax.grad(lambda z: optax.softmax_cross_entropy(z, y).sum()))(z),
        **F32,
    )
    # axis 0 and a tuple axis
    zt, yt = np.moveaxis(z, -1, 0), np.moveaxis(y, -1, 0)
    np.testing.assert_allclose(ce_soft(zt, yt, 0), optax.softmax_cross_entropy(zt, yt, 0), **F32)
    z3 = z.reshape(4, 1, 5)
    y3 = y.reshape(4, 1, 5)
    np.testing.assert_allclose(
        ce_soft(z3, y3, (1, 2)), optax.softmax_cross_entropy(z3, y3, (1, 2)), **F32
    )


def test_optax_parity_soft_where(rng):
    z = rng.normal(size=(4, 5)).astype(np.float32)
    y = dirichlet(rng, (4, 5))
    rows = np.array([True, False, True, True])  # batch shape: masks whole examples
    np.testing.assert_allclose(
        ce_soft(z, y, where=rows), optax.softmax_cross_entropy(z, y, where=jnp.asarray(rows)), **F32
    )
    np.testing.assert_array_equal(ce_soft(z, y, where=rows)[1], 0.0)
    full = rng.random((4, 5)) > 0.3
    full[:, 0] = True
    y_masked = np.where(full, y, 0.0).astype(np.float32)
    np.testing.assert_allclose(
        ce_soft(z, y_masked, where=full),
        optax.softmax_cross_entropy(z, y_masked, where=jnp.asarray(full)),
        **F32,
    )


def test_optax_parity_integer(rng):
    z = rng.normal(size=(4, 5)).astype(np.float32) * 2
    y = rng.integers(0, 5, size=4)
    np.testing.assert_allclose(ce_int(z, y), optax.softmax_cross_entropy_with_integer_labels(z, y), **F32)
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda z: ce_int(z, y).sum()))(z),
        jax.jit(jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).sum()))(z),
        **F32,
    )
    # tuple axis: classes over axes (1, 2) of a (2, 3, 4) input, labels a flat C-order index.
    z3 = rng.normal(size=(2, 3, 4)).astype(np.float32)
    y3 = rng.integers(0, 12, size=2)
    np.testing.assert_allclose(
        ce_int(z3, y3, (1, 2)),
        optax.softmax_cross_entropy_with_integer_labels(z3, y3, axis=(1, 2)),
        **F32,
    )
    # axis 0
    y0 = rng.integers(0, 3, size=4)
    z0 = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(
        ce_int(z0, y0, 0), optax.softmax_cross_entropy_with_integer_labels(z0, y0, axis=0), **F32
    )
    # a mask of classes
    full = rng.random((4, 5)) > 0.3
    full[np.arange(4), y] = True
    np.testing.assert_allclose(
        ce_int(z, y, where=full),
        optax.softmax_cross_entropy_with_integer_labels(z, y, where=jnp.asarray(full)),
        **F32,
    )


@pytest.mark.parametrize(
    "num_classes, chunk",
    [(32768, None), (65536, 32768), (131072, 32768), (128256, 32064), (151936, 18992),
     (262144, 32768), (50257, 1733), (65537, None)],
)
def test_row_chunk_divides_long_rows(num_classes, chunk):
    # Llama 3's 128256 and Qwen's 151936 classes, GPT-2's 50257 = 29 x 1733; the prime 65537
    # has no divisor in [1024, 32768]: its rows are summed whole.
    from jaxce._row_sums import row_chunk

    assert row_chunk(num_classes) == chunk


@pytest.mark.parametrize("num_classes", [98304, 65537])  # chunks of 32768; a prime: whole rows
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("forms", ["cpu", "plain"])
def test_rows_longer_than_a_chunk(rng, num_classes, dtype, forms, monkeypatch):
    """Rows beyond jaxce._row_sums.ROW_CHUNK classes (summed in chunks on XLA:CPU) against
    float64: values and gradients of both label kinds, with -inf logits in every chunk, a
    row whose label is the only possible class and one whose label is impossible."""
    from jaxce import _row_sums

    monkeypatch.setattr(_row_sums, "CPU_FORMS", forms == "cpu")
    n = 4
    z = (rng.normal(size=(n, num_classes)) * 3).astype(np.float32)
    z[rng.random(z.shape) < 0.01] = -np.inf
    y = rng.integers(0, num_classes, size=n)
    z[0, y[0]] = 5.0
    z[1] = -np.inf
    z[1, y[1]] = 0.0  # the only possible class: loss 0, gradient 0
    z[2, y[2]] = -np.inf  # an impossible label: loss +inf
    z = np.asarray(jnp.asarray(z, dtype).astype(jnp.float32), np.float64)  # what dtype holds
    top = z.max(axis=-1, keepdims=True)
    lse = (top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True)))[:, 0]
    p = np.exp(z - lse[:, None])
    onehot = np.zeros_like(z)
    onehot[np.arange(n), y] = 1.0
    soft = 0.5 * onehot + 0.5 * (p > 0) / (p > 0).sum(axis=-1, keepdims=True)
    zj = jnp.asarray(z, dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-3)
    expected = lse - z[np.arange(n), y]
    # fresh functions: jax.jit(ce_int) would be traced once, under the other forms' setting
    np.testing.assert_allclose(jax.jit(lambda z: ce_int(z, y))(zj), expected, rtol=1e-5)
    grad_int = jax.jit(jax.grad(lambda z: ce_int(z, jnp.asarray(y))[jnp.asarray([0, 1, 3])].sum()))(zj)
    expected_grad = (p - onehot) * np.array([1.0, 1.0, 0.0, 1.0])[:, None]
    np.testing.assert_allclose(np.asarray(grad_int, np.float64), expected_grad, **tol)
    sj = jnp.asarray(soft[[0, 1, 3]], jnp.float32)
    zs = zj[jnp.asarray([0, 1, 3])]
    finite = np.where(soft[[0, 1, 3]] > 0, z[[0, 1, 3]], 0.0)
    expected_soft = (soft[[0, 1, 3]] * (lse[[0, 1, 3], None] - finite)).sum(axis=-1)
    np.testing.assert_allclose(jax.jit(lambda z: ce_soft(z, sj))(zs), expected_soft, rtol=1e-5)
    grad_soft = jax.jit(jax.grad(lambda z: ce_soft(z, sj).sum()))(zs)
    np.testing.assert_allclose(
        np.asarray(grad_soft, np.float64), p[[0, 1, 3]] - soft[[0, 1, 3]], **tol
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("forms", ["cpu", "plain"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch_of_long_rows(dtype, forms, reduction, monkeypatch):
    """No rows of 65536 classes (summed in chunks on XLA:CPU): the per-example loss is empty,
    the reduced loss 0, and the gradient an empty array of the logits' shape, for integer
    labels with smoothing and for soft labels."""
    from jaxce import _row_sums

    monkeypatch.setattr(_row_sums, "CPU_FORMS", forms == "cpu")
    z = jnp.zeros((0, 65536), dtype)
    losses = {
        "int": lambda z: ce_int(z, jnp.zeros((0,), jnp.int32), label_smoothing=0.1,
                                reduction=reduction),
        "soft": lambda z: ce_soft(z, jnp.zeros((0, 65536), dtype), reduction=reduction),
    }
    for name, loss in losses.items():
        out = jax.jit(loss)(z)  # (fresh functions: traced under this test's forms)
        assert out.shape == ((0,) if reduction == "none" else ()), name
        if reduction != "none":
            assert float(out) == 0.0, name
        grad = jax.jit(jax.grad(lambda z: loss(z).sum()))(z)
        assert grad.shape == z.shape and grad.dtype == dtype, name


def test_integer_per_example_where_of_batch_shape(rng):
    z = rng.normal(size=(4, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=4)
    rows = np.array([True, False, False, True])
    ref = np.where(rows, sp.logsumexp(f64(z), -1) - f64(z)[np.arange(4), y], 0.0)
    np.testing.assert_allclose(ce_int(z, y, where=rows), ref, **F32)
    full = np.broadcast_to(rows[:, None], (4, 5))
    np.testing.assert_allclose(
        ce_int(z, y, where=rows),
        optax.softmax_cross_entropy_with_integer_labels(z, y, where=jnp.asarray(full)),
        **F32,
    )
    np.testing.assert_allclose(
        ce_int(z, y, where=rows, reduction="mean"), ref.sum() / 2, **F32
    )
    g = jax.grad(lambda z: ce_int(z, y, where=rows).sum())(z)
    np.testing.assert_array_equal(np.asarray(g)[~rows], 0.0)


@pytest.mark.parametrize("forms", ["cpu", "plain"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["int", "soft", "sparse"])
@pytest.mark.parametrize("where_shape", ["batch", "keepdims"])
@pytest.mark.parametrize("options", [False, True])
def test_example_mask_leaves_junk_rows_out(rng, monkeypatch, forms, dtype, kind, where_shape, options):
    """A ``where`` constant over the classes leaves out whole examples: NaN and infinite
    logits, labels and sample weights there reach neither the value nor any gradient (an
    ignored row's too), and the kept rows match the float64 reference."""
    from jaxce import _row_sums

    monkeypatch.setattr(_row_sums, "CPU_FORMS", forms == "cpu")
    n, k = 6, 7
    rows = np.array([True, False, True, False, True, False])
    z = np.asarray(jnp.asarray(rng.normal(size=(n, k)) * 3, dtype).astype(jnp.float32))
    junk = z.copy()
    junk[1], junk[3, 2], junk[5] = np.nan, np.inf, -np.inf
    ints = rng.integers(0, k, size=n)
    soft = dirichlet(rng, (n, k))
    soft = np.asarray(jnp.asarray(soft, dtype).astype(jnp.float32))
    ignore = {}
    if kind == "int":
        ints[[1, 3, 5]] = [-1, k + 5, -100]
        ints[2], junk[2] = -100, np.nan  # ignored, with NaN logits
        ignore = {"ignore_index": -100}
        labels, ref_labels = (ints,), ints
    elif kind == "soft":
        junk_soft = soft.copy()
        junk_soft[1], junk_soft[3, 0] = np.nan, np.inf
        labels, ref_labels = (jnp.asarray(junk_soft, dtype),), soft
    else:  # k = 2 entries, the second of weight 0 (padding); junk entries on masked rows
        idx = np.stack([ints, np.full(n, -1)], -1)
        wts = np.stack([np.full(n, 0.75), np.zeros(n)], -1).astype(np.float32)
        idx[1], wts[1], wts[3, 0] = [k + 3, -7], [np.nan, 1.0], np.inf
        labels, ref_labels = (idx, wts), 0.75 * np.eye(k)[ints]
    opts = dict(label_smoothing=0.1, z_loss=0.01, reduction="mean") if options else {}
    cw = (rng.random(k) + 0.5).astype(np.float32) if options else None
    sw = np.where(rows, rng.random(n) + 0.5, np.nan).astype(np.float32)
    where = rows if where_shape == "batch" else rows[:, None]
    loss = {"int": ce_int, "soft": ce_soft, "sparse": jaxce.softmax_cross_entropy_with_sparse_labels}[kind]

    def f(z, labels, cw, sw):
        out = loss(z, *labels, where=where, class_weights=cw, sample_weights=sw, **ignore, **opts)
        return jnp.sum(out)

    soft_argnum = (1,) if kind == "soft" else ()
    argnums = (0, 3) + soft_argnum + ((2,) if options else ())
    value, grads = jax.jit(jax.value_and_grad(f, argnums))(jnp.asarray(junk, dtype), labels, cw, sw)
    grads = dict(zip(argnums, grads))
    ref_kw = dict(integer=kind == "int", mask=np.broadcast_to(rows[:, None], (n, k)),
                  eps=opts.get("label_smoothing", 0.0), zl=opts.get("z_loss", 0.0),
                  reduction=opts.get("reduction", "none"), ignore=ignore.get("ignore_index"))
    clean_sw = np.where(rows, sw, 1.0)
    ref = np.sum(np_ref(z, ref_labels, cw=cw, sw=clean_sw, **ref_kw))
    tol = F32 if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6)
    names = ("z", "labels", "cw", "sw")  # (jnp_ref_grad takes sw after cw: ones for none)
    argnums = tuple(i for i, name in enumerate(names) if name != "labels" or kind == "soft")
    ref_cw = np.ones(k, np.float32) if cw is None else cw
    ref_grads = jnp_ref_grad(argnums, z, ref_labels, cw=ref_cw, sw=clean_sw, **ref_kw)
    ref_grads = dict(zip([names[i] for i in argnums], ref_grads))
    dead = ~rows | (ints == -100) if kind == "int" else ~rows
    gz = np.asarray(grads[0].astype(jnp.float32))
    assert grads[0].dtype == dtype
    np.testing.assert_array_equal(gz[dead], 0.0)
    np.testing.assert_allclose(gz, ref_grads["z"], **tol)
    np.testing.assert_array_equal(np.asarray(grads[3])[dead], 0.0)
    np.testing.assert_allclose(grads[3], np.where(rows, ref_grads["sw"], 0.0), **tol)
    if kind == "soft":
        gy = np.asarray(grads[1][0].astype(jnp.float32))
        np.testing.assert_array_equal(gy[dead], 0.0)
        np.testing.assert_allclose(gy, ref_grads["labels"], **tol)
    if options:
        np.testing.assert_allclose(grads[2], ref_grads["cw"], **tol)


def test_optax_parity_sigmoid_bce(rng):
    z = rng.normal(size=(3, 4)).astype(np.float32) * 3
    y = rng.random((3, 4)).astype(np.float32)
    np.testing.assert_allclose(bce(z, y), optax.sigmoid_binary_cross_entropy(z, y), **F32)
    np.testing.assert_allclose(
        jax.grad(lambda z: bce(z, y).sum())(z),
        jax.grad(lambda z: optax.sigmoid_binary_cross_entropy(z, y).sum())(z),
        **F32,
    )


# ------------------------------------------------------------------------------------------
# The custom gradient: closed form, plain composition, jacfwd of plain softmax, Hessian


def plain_ce(x, y):
    return -(y * jnp.log(jax.nn.softmax(x))).sum()


@jax.jit
def _gradients(x, y):
    """The custom gradient, the plain composition's, and the chain rule through jacfwd."""
    jac = jax.jacfwd(jax.nn.softmax)(x)
    return (
        jax.grad(ce_soft)(x, y),
        jax.grad(plain_ce)(x, y),
        jac.T @ (-y / jax.nn.softmax(x)),
        jax.grad(ce_soft, 1)(x, y),
        jax.grad(plain_ce, 1)(x, y),
    )


@pytest.mark.parametrize("mass", [1.0, 0.4, 2.5])
def test_custom_gradient_equals_closed_form_and_autodiff(rng, mass):
    x = rng.normal(size=(5,)).astype(np.float32) * 2
    y = dirichlet(rng, (5,)) * np.float32(mass)
    p = sp.softmax(f64(x))
    closed = p * f64(y).sum() - f64(y)
    g, g_plain, g_chain, gy, gy_plain = _gradients(x, y)
    np.testing.assert_allclose(g, closed, **F32)
    np.testing.assert_allclose(g, g_plain, **F32)
    np.testing.assert_allclose(g, g_chain, **F32)  # J^T (-y / p), J = jacfwd(plain softmax)
    # Soft-label gradient: -log_softmax.
    np.testing.assert_allclose(gy, -sp.log_softmax(f64(x)), **F32)
    np.testing.assert_allclose(gy_plain, -sp.log_softmax(f64(x)), **F32)


def test_custom_gradient_integer_batch_and_tuple_axis(rng):
    z = rng.normal(size=(3, 2, 4)).astype(np.float32)
    y = rng.integers(0, 8, size=3)
    flat = f64(z).reshape(3, 8)
    expected = (sp.softmax(flat, -1) - np.eye(8)[y]).reshape(3, 2, 4)
    g = jax.jit(jax.grad(lambda z: ce_int(z, y, (1, 2)).sum()))(z)
    np.testing.assert_allclose(g, expected, **F32)
    onehot = np.eye(8, dtype=np.float32)[y].reshape(3, 2, 4)
    g = jax.jit(jax.grad(lambda z: ce_soft(z, onehot, (1, 2)).sum()))(z)
    np.testing.assert_allclose(g, expected, **F32)
    # The same under vmap.
    gv = jax.jit(jax.vmap(jax.grad(lambda r, l: ce_int(r, l, (0, 1)))))(z, y)
    np.testing.assert_allclose(gv, expected, **F32)


def test_hessian_batch(rng):
    z = rng.normal(size=(2, 3)).astype(np.float32)
    y = dirichlet(rng, (2, 3)) * np.float32(1.7)
    h = jax.jit(jax.hessian(lambda z: ce_soft(z, y).sum()))(z)  # [2, 3, 2, 3]
    for n in range(2):
        p = sp.softmax(f64(z[n]))
        np.testing.assert_allclose(
            h[n, :, n, :], (np.diag(p) - np.outer(p, p)) * f64(y[n]).sum(), rtol=1e-5, atol=1e-7
        )
    np.testing.assert_array_equal(np.asarray(h)[0, :, 1, :], 0.0)
    labels = np.array([2, 0])
    h = jax.jit(jax.hessian(lambda z: ce_int(z, labels).sum()))(z)
    p = sp.softmax(f64(z[1]))
    np.testing.assert_allclose(h[1, :, 1, :], np.diag(p) - np.outer(p, p), rtol=1e-5, atol=1e-7)
    h = jax.jit(jax.hessian(lambda z: bce(z, y).sum()))(z)
    s = sp.expit(f64(z))
    np.testing.assert_allclose(
        np.einsum("ijij->ij", np.asarray(h)), s * (1 - s), rtol=1e-5, atol=1e-7
    )


def test_check_grads():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        z = jnp.asarray(rng.normal(size=(2, 4)))
        y = jnp.asarray(sp.softmax(rng.normal(size=(2, 4)), -1))
        labels = jnp.array([1, 3])
        # The plain references the other tests differentiate.
        check_grads(jax.jit(plain_ce), (z, y), order=1, modes=["fwd", "rev"])
        plain = lambda z: ref_ce(
            jnp, z, labels, integer=True, eps=0.1, zl=0.1, cap=3.0, sg=jax.lax.stop_gradient
        ).sum()
        check_grads(jax.jit(plain), (z,), order=1, modes=["fwd", "rev"])
        # The custom VJPs: reverse mode, and second order through the backward pass.
        options = dict(label_smoothing=0.1, z_loss=0.2, logit_softcap=2.0, base=2)
        check_grads(jax.jit(lambda z, y: ce_soft(z, y, **options).sum()), (z, y), 2, modes=["rev"])
        check_grads(jax.jit(lambda z: ce_int(z, labels, **options).sum()), (z,), 1, modes=["rev"])
        check_grads(jax.jit(lambda z, y: bce(z, y).sum()), (z, y), order=1, modes=["rev"])


@pytest.mark.parametrize("base", [2, 10, 0.5])
def test_base_divides_loss_and_gradient(rng, base):
    z = rng.normal(size=(3, 4)).astype(np.float32)
    y = dirichlet(rng, (3, 4))
    labels = np.array([0, 3, 1])
    s = math.log(base)
    for f, lab in ((ce_soft, y), (ce_int, labels), (bce, y)):
        v0, g0 = jax.value_and_grad(lambda z: f(z, lab).sum())(z)
        v, g = jax.value_and_grad(lambda z: f(z, lab, base=base).sum())(z)
        np.testing.assert_allclose(v, v0 / s, rtol=1e-6)
        np.testing.assert_allclose(g, g0 / s, rtol=1e-6, atol=1e-7)
    lp = jaxce.log_softmax(z)
    np.testing.assert_allclose(
        jaxce.nll_loss(lp, labels, base=base), jaxce.nll_loss(lp, labels) / s, rtol=1e-6
    )


# ------------------------------------------------------------------------------------------
# Reductions, ignore_index, out-of-range labels


def test_reductions(rng):
    z = rng.normal(size=(4, 3)).astype(np.float32)
    y = dirichlet(rng, (4, 3))
    labels = np.array([0, 2, 1, 1])
    per = np_ref(z, labels, integer=True)
    np.testing.assert_allclose(ce_int(z, labels, reduction="sum"), per.sum(), **F32)
    np.testing.assert_allclose(ce_int(z, labels, reduction="mean"), per.mean(), **F32)
    per = np_ref(z, y, integer=False)
    np.testing.assert_allclose(ce_soft(z, y, reduction="sum"), per.sum(), **F32)
    np.testing.assert_allclose(ce_soft(z, y, reduction="mean"), per.mean(), **F32)
    o = sp.expit(f64(z))
    per = -(f64(y) * np.log(o) + (1 - f64(y)) * np.log1p(-o))
    np.testing.assert_allclose(bce(z, y, reduction="sum"), per.sum(), **F32)
    np.testing.assert_allclose(bce(z, y, reduction="mean"), per.mean(), **F32)
    for out in (ce_int(z, labels, reduction="mean"), ce_soft(z, y, reduction="sum")):
        assert out.shape == () and out.dtype == jnp.float32


def test_ignore_index(rng):
    z = rng.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, -100, 2, -100])
    out = ce_int(z, labels, ignore_index=-100)
    np.testing.assert_allclose(out, np_ref(z, labels, integer=True, ignore=-100), **F32)
    np.testing.assert_array_equal(np.asarray(out)[[1, 3]], 0.0)
    mean = ce_int(z, labels, ignore_index=-100, reduction="mean")
    np.testing.assert_allclose(mean, np.asarray(out).sum() / 2, **F32)  # 2 counted, not 4
    g = jax.grad(lambda z: ce_int(z, labels, ignore_index=-100, reduction="mean"))(z)
    p = sp.softmax(f64(z), -1)
    expected = np.zeros((4, 3))
    for n, c in ((0, 0), (2, 2)):
        expected[n] = (p[n] - np.eye(3)[c]) / 2
    np.testing.assert_allclose(g, expected, **F32)
    # ignore_index may be a valid class id (PyTorch allows it): that class is ignored.
    out = ce_int(z, np.array([0, 1, 2, 0]), ignore_index=0)
    np.testing.assert_array_equal(np.asarray(out)[[0, 3]], 0.0)
    assert np.all(np.asarray(out)[[1, 2]] > 0)


def test_mean_with_nothing_counted_is_zero_with_zero_gradient(rng):
    z = rng.normal(size=(3, 4)).astype(np.float32)
    labels = np.full(3, -1)
    cases = [
        lambda z: ce_int(z, labels, ignore_index=-1, reduction="mean"),
        lambda z: ce_int(z, labels, ignore_index=-1, reduction="mean", class_weights=jnp.ones(4)),
        lambda z: ce_int(z, np.zeros(3, int), where=np.zeros(3, bool), reduction="mean"),
        lambda z: ce_soft(z, dirichlet(rng, (3, 4)), where=np.zeros(3, bool), reduction="mean"),
        lambda z: ce_soft(z, dirichlet(rng, (3, 4)), where=np.zeros((3, 4), bool), reduction="mean"),
        lambda z: bce(z, np.ones((3, 4), np.float32), where=np.zeros((3, 4), bool), reduction="mean"),
        lambda z: jaxce.nll_loss(z, labels, ignore_index=-1, reduction="mean"),
    ]
    for f in cases:
        v, g = jax.value_and_grad(f)(z)
        assert float(v) == 0.0
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("bad_label", [-1, 4, 100, -100])
def test_out_of_range_label_is_nan_not_a_wrap(rng, bad_label):
    z = rng.normal(size=(2, 4)).astype(np.float32)
    labels = np.array([1, bad_label])
    out = np.asarray(ce_int(z, labels))
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[0], sp.logsumexp(f64(z[0])) - z[0, 1], **F32)
    assert np.isnan(float(ce_int(z, labels, reduction="mean")))
    assert np.isnan(np.asarray(jaxce.nll_loss(jaxce.log_softmax(z), labels))[1])
    # Not the loss of the wrapped class (what optax returns for -1).
    wrapped = optax.softmax_cross_entropy_with_integer_labels(z, np.array([1, -1]))
    assert np.isfinite(np.asarray(wrapped)[1])
    # With another ignore_index, the bad label still gives NaN.
    assert np.isnan(np.asarray(ce_int(z, labels, ignore_index=-7))[1])


# ------------------------------------------------------------------------------------------
# Edge cases: no NaN where the math is finite


NEG = -np.inf
EDGE = [
    # (name, logits row, soft label row, integer label)
    ("-inf logit, label 0 on it", [2.0, NEG, 0.0], [1.0, 0.0, 0.0], 0),
    ("two -inf logits", [NEG, 1.0, NEG, -1.0], [0.0, 0.3, 0.0, 0.7], 3),
    ("logits +-1e4", [1e4, -1e4, 0.0], [0.0, 0.0, 1.0], 2),
    ("logits +-1e4 label on the max", [1e4, -1e4, 0.0], [1.0, 0.0, 0.0], 0),
    ("logits 1e4 spread", [1e4, 1e4 - 1, 1e4 - 2], [0.0, 1.0, 0.0], 1),
    ("logits +3e38", [3e38, 0.0, -3e38], [1.0, 0.0, 0.0], 0),
    ("logits +3e38 wrong class", [3e38, 0.0, -3e38], [0.0, 1.0, 0.0], 1),
    ("logits -3e38", [-3e38, -3e38, 0.0], [0.0, 0.0, 1.0], 2),
    ("logits all -1e4", [-1e4, -1e4, -1e4], [1.0, 0.0, 0.0], 0),
    ("logits all 3e38", [3e38, 3e38, 3e38], [1.0, 0.0, 0.0], 0),
]


def edge_reference(z, y):
    """float64 loss and gradient p * sum(y) - y, exact for the float32 inputs."""
    z = f64(z)
    y = f64(y)
    # log p = (z - max) - lse(z - max): exact even at 3e38, where float64's z - lse(z) would
    # round log K away.
    shifted = z - np.max(z)
    with np.errstate(invalid="ignore"):
        loss = -np.sum(np.where(y > 0, y * (shifted - sp.logsumexp(shifted)), 0.0))
    return loss, sp.softmax(z) * y.sum() - y


def as_float32(x):
    """float64 values as float32 would hold them: beyond its range is +-inf."""
    x = np.array(x, np.float64)
    big = np.abs(x) > np.finfo(np.float32).max
    x[big] = np.sign(x[big]) * np.inf
    return x


@pytest.mark.parametrize("name,z_row,y_row,label", EDGE)
def test_edge_case_table(name, z_row, y_row, label):
    z = jnp.array(z_row, jnp.float32)
    y = jnp.array(y_row, jnp.float32)
    onehot = np.eye(len(z_row))[label]
    for f, lab, target in ((ce_soft, y, y), (ce_int, jnp.array(label), onehot)):
        ref_loss, ref_grad = edge_reference(np.asarray(z), target)
        v, g = jax.value_and_grad(f)(z, lab)
        assert np.isfinite(float(v)) and np.isfinite(np.asarray(g)).all(), (f, v, g)
        np.testing.assert_allclose(float(v), ref_loss, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(g, ref_grad, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(g)[~np.isfinite(f64(z))], 0.0)
    # The soft-label gradient is -log p: +inf on a -inf class (more mass there costs
    # without bound), finite elsewhere.
    gy = np.asarray(jax.grad(ce_soft, 1)(z, y), np.float64)
    with np.errstate(invalid="ignore"):
        shifted = f64(z) - np.max(f64(z))
        ref_gy = as_float32(-(shifted - sp.logsumexp(shifted)))
    finite = np.isfinite(f64(z))
    np.testing.assert_array_equal(gy[~finite], np.inf)
    np.testing.assert_allclose(gy[finite], ref_gy[finite], rtol=1e-5, atol=1e-5)


def test_neg_inf_logit_beats_optax_nan():
    z = jnp.array([2.0, -jnp.inf, 0.0])
    y = jnp.array([1.0, 0.0, 0.0])
    assert np.isnan(float(optax.softmax_cross_entropy(z, y)))  # optax issue 896
    np.testing.assert_allclose(ce_soft(z, y), sp.logsumexp([2.0, 0.0]) - 2.0, rtol=1e-6)


def test_integer_label_on_neg_inf_or_masked_class_is_inf():
    z = jnp.array([2.0, -jnp.inf, 0.0])
    assert float(ce_int(z, jnp.array(1))) == np.inf
    m = jnp.array([True, False, True])
    assert float(ce_int(jnp.array([2.0, 1.0, 0.0]), jnp.array(1), where=m)) == np.inf



@pytest.mark.parametrize(
    "y,label",
    [
        ([1.0, 0.0, 0.0], 0),
        ([0.5, 0.5, 0.0], None),
        ([0.0, 1.0, 0.0], 1),
    ],
)
def test_pos_inf_logit_gives_nan(y, label):
    z = jnp.array([jnp.inf, 0.0, 1.0])
    assert np.isnan(float(ce_soft(z, jnp.array(y))))
    if label is not None:
        assert np.isnan(float(ce_int(z, jnp.array(label))))


def test_masked_rows_loss_and_gradient_zero(rng):
    z = rng.normal(size=(3, 4)).astype(np.float32)
    y = dirichlet(rng, (3, 4))
    labels = np.array([1, 2, 3])
    rows = np.array([True, False, True])
    for f, lab in ((ce_soft, y), (ce_int, labels)):
        out = f(z, lab, where=rows)
        assert float(out[1]) == 0.0
        g = jax.grad(lambda z: f(z, lab, where=rows).sum())(z)
        np.testing.assert_array_equal(np.asarray(g)[1], 0.0)
        ref = np_ref(z, lab, integer=f is ce_int)
        np.testing.assert_allclose(np.asarray(out)[rows], ref[rows], **F32)
    # A class-shaped mask that masks everything in one row by broadcasting
    full = np.ones((3, 4), bool)
    full[2] = False
    v, g = jax.value_and_grad(lambda z: ce_soft(z, y, where=full, z_loss=0.1).sum())(z)
    assert np.isfinite(float(v))
    np.testing.assert_array_equal(np.asarray(g)[2], 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(rng, dtype):
    z = jnp.asarray(rng.normal(size=(3, 5)) * 3, dtype)
    y = jnp.asarray(dirichlet(rng, (3, 5)), dtype)
    labels = np.array([0, 4, 2])
    z64, y64 = f64(z.astype(jnp.float32)), f64(y.astype(jnp.float32))
    cases = [
        (lambda z: ce_soft(z, y), np_ref(z64, y64, integer=False), sp.softmax(z64, -1) * y64.sum(-1, keepdims=True) - y64),
        (lambda z: ce_int(z, labels), np_ref(z64, labels, integer=True), sp.softmax(z64, -1) - np.eye(5)[labels]),
        (lambda z: bce(z, y), None, sp.expit(z64) - y64),
    ]
    for f, ref, ref_grad in cases:
        out = f(z)
        assert out.dtype == jnp.float32  # not a quantised bf16 loss (optax issue 1020)
        if ref is not None:
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda z: f(z).sum())(z)
        assert g.dtype == dtype
        assert np.isfinite(np.asarray(g.astype(jnp.float32))).all()
        np.testing.assert_allclose(g.astype(jnp.float32), ref_grad, rtol=1e-2, atol=1e-2)
    gy = jax.grad(lambda y: ce_soft(z, y).sum())(y)
    assert gy.dtype == dtype


def test_sigmoid_bce_at_infinite_logits():
    z = jnp.array([jnp.inf, -jnp.inf, jnp.inf, -jnp.inf, 50.0, -50.0, 1e4, -1e4])
    y = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    v = np.asarray(bce(z, y))
    g = np.asarray(jax.grad(lambda z: bce(z, y).sum())(z))
    np.testing.assert_array_equal(v[:2], 0.0)  # the label allows it: loss 0 ...
    np.testing.assert_array_equal(g[:2], 0.0)  # ... and gradient 0
    assert v[2] == np.inf and v[3] == np.inf  # certain and wrong
    np.testing.assert_array_equal(g[2:4], [1.0, -1.0])  # sigma(z) - y, finite
    np.testing.assert_allclose(v[4:6], np.log1p(np.exp(-50.0)), rtol=1e-6)
    np.testing.assert_allclose(v[6:], 1e4, rtol=1e-7)
    np.testing.assert_allclose(g[6:], [1.0, -1.0])
    assert np.isfinite(g).all()


@pytest.mark.parametrize("pos_weight", [1.0, 3.0])
def test_sigmoid_bce_gradient_keeps_its_precision_at_large_logits(pos_weight):
    """d/dz = (1 - y) sigma(z) - a sigma(-z) (a = pos_weight y): where sigma(z) rounds to 1 the
    form sigma(z) (a + 1 - y) - a gave 1 - 1 = 0 for the tiny -a sigma(-z) (z > 17, y = 1)."""
    z = np.array([17.0, 30.0, 50.0, -30.0, -50.0], np.float32)
    y = np.array([1.0, 1.0, 1.0, 0.0, 0.0], np.float32)
    g = np.asarray(jax.grad(lambda z: bce(z, y, pos_weight=pos_weight).sum())(z), np.float64)
    z64, y64 = f64(z), f64(y)
    want = (1 - y64) * sp.expit(z64) - pos_weight * y64 * sp.expit(-z64)
    np.testing.assert_allclose(g, want, rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_at_infinite_and_large_logits(gamma):
    """jaxce.losses.sigmoid_focal_loss: an infinite logit on the label's side has loss 0 and
    gradient 0 (exp(0 * -inf) and 0 * inf gave NaN); at large finite logits the value and the
    gradient match float64 (the gradient once lost sigma(-z) to cancellation)."""
    z = np.array([np.inf, -np.inf, 20.0, -20.0, 1.5], np.float32)
    y = np.array([1.0, 0.0, 1.0, 0.0, 1.0], np.float32)
    focal = lambda z: jaxce.losses.sigmoid_focal_loss(z, y, gamma=gamma)
    v = np.asarray(focal(z), np.float64)
    g = np.asarray(jax.grad(lambda z: focal(z).sum())(z), np.float64)
    np.testing.assert_array_equal(v[:2], 0.0)
    np.testing.assert_array_equal(g[:2], 0.0)
    z64, y64 = f64(z[2:]), f64(y[2:])

    def ref(z):  # float64: (1 - p_t)^gamma * BCE
        p = sp.expit(z)
        p_t = y64 * p + (1 - y64) * (1 - p)
        return (1 - p_t) ** gamma * (y64 * np.logaddexp(0, -z) + (1 - y64) * np.logaddexp(0, z))

    # hard labels: with u = +-z (the label's side) and q = 1 - p_t = sigma(-u), L = q^gamma
    # softplus(-u) and dL/du = -q^gamma (gamma sigma(u) softplus(-u) + q)
    sign = 2 * y64 - 1
    u = sign * z64
    q = sp.expit(-u)
    grad = -sign * q**gamma * (gamma * sp.expit(u) * np.logaddexp(0, -u) + q)
    np.testing.assert_allclose(v[2:], ref(z64), rtol=1e-5)
    np.testing.assert_allclose(g[2:], grad, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Bad input: the error message names what was wrong

Z = jnp.zeros((2, 3))
Y = jnp.full((2, 3), 1 / 3)
L = jnp.array([0, 1])

BAD = [
    (lambda: ce_soft(Z, jnp.ones((2, 4)) / 4), ValueError, r"labels shape \(2, 4\) does not match logits shape \(2, 3\)"),
    (lambda: ce_soft(Z, jnp.ones(3) / 3), ValueError, r"labels shape \(3,\) does not match logits shape \(2, 3\)"),
    (lambda: ce_int(Z, jnp.array([0, 1, 2])), ValueError, r"labels shape \(3,\) does not match logits shape without axis -1 \(2,\)"),
    (lambda: ce_int(Z, jnp.array([[0, 1]])), ValueError, r"labels shape \(1, 2\)"),
    (lambda: ce_soft(jnp.zeros((2, 3), int), Y), TypeError, r"logits must have a real floating dtype, got int32"),
    (lambda: ce_int(jnp.zeros((2, 3), jnp.complex64), L), TypeError, r"logits must have a real floating dtype, got complex64"),
    (lambda: bce(jnp.array([1, 2]), jnp.array([1.0, 0.0])), TypeError, r"logits must have a real floating dtype, got int32"),
    (lambda: jaxce.logsumexp(Z, keepdims="no"), TypeError, r"keepdims must be a bool, got 'no'"),
    (lambda: ce_int(Z, L, return_aux="yes"), TypeError, r"return_aux must be a bool, got 'yes'"),
    (lambda: jaxce.label_log_probs(Z, L, return_entropy=1), TypeError, r"return_entropy must be a bool, got 1"),
    (lambda: ce_int(Z, jnp.array([0.0, 1.0])), TypeError, r"labels must have an integer dtype, got float32"),
    (lambda: ce_soft(Z, jnp.zeros((2, 3), int)), TypeError, r"labels must have a real floating dtype, got int32"),
    (lambda: jaxce.nll_loss(Z, jnp.array([0.0, 1.0])), TypeError, r"labels must have an integer dtype"),
    (lambda: jaxce.nll_loss(jnp.zeros((2, 3), int), L), TypeError, r"log_probs must have a real floating dtype"),
    (lambda: ce_soft(Z, Y, axis=2), ValueError, r"axis 2 is out of range for an input of rank 2"),
    (lambda: ce_int(Z, L, axis=-3), ValueError, r"axis -3 is out of range"),
    (lambda: ce_int(jnp.zeros((2, 3, 4)), L, axis=(1, 5)), ValueError, r"axis 5 is out of range"),
    (lambda: ce_soft(Z, Y, base=0), ValueError, r"base must be finite, > 0 and != 1, got 0"),
    (lambda: ce_int(Z, L, base=-1.5), ValueError, r"got -1.5"),
    (lambda: ce_int(Z, L, base=1), ValueError, r"!= 1, got 1"),
    (lambda: bce(Z, Y, base=1.0), ValueError, r"!= 1, got 1.0"),
    (lambda: jaxce.nll_loss(Z, L, base=0.0), ValueError, r"> 0 and != 1, got 0.0"),
    (lambda: ce_soft(Z, Y, reduction="avg"), ValueError, r"reduction must be one of \('none', 'sum', 'mean', 'segment_mean'\), got 'avg'"),
    (lambda: ce_int(Z, L, reduction="Mean"), ValueError, r"got 'Mean'"),
    (lambda: bce(Z, Y, reduction=None), ValueError, r"reduction must be one of"),
    (lambda: jaxce.nll_loss(Z, L, reduction="batchmean"), ValueError, r"got 'batchmean'"),
    (lambda: ce_soft(Z, Y, label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1(\.0)?\), got 1.0"),
    (lambda: ce_int(Z, L, label_smoothing=-0.1), ValueError, r"label_smoothing must be in \[0, 1(\.0)?\), got -0.1"),
    (lambda: bce(Z, Y, label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1(\.0)?\), got 1.5"),
    (lambda: ce_int(Z, L, label_smoothing="0.1"), TypeError, r"label_smoothing must be a Python number"),
    (lambda: ce_soft(Z, Y, z_loss=-1e-4), ValueError, r"z_loss must be in \[0, inf\), got -0.0001"),
    (lambda: ce_int(Z, L, z_loss=float("nan")), ValueError, r"z_loss must be in \[0, inf\), got nan"),
    (lambda: ce_soft(Z, Y, logit_softcap=0.0), ValueError, r"logit_softcap must be in \(0, 2\*\*100 = 1.3e30\], got 0.0"),
    (lambda: ce_int(Z, L, logit_softcap=-30), ValueError, r"logit_softcap must be in \(0, 2\*\*100 = 1.3e30\], got -30"),
    (lambda: ce_int(Z, L, logit_softcap=3e38), ValueError, r"logit_softcap must be in .*got 3e\+38"),
    (lambda: ce_int(Z, L, logit_softcap=float("inf")), ValueError, r"logit_softcap must be in .*got inf"),
    (lambda: ce_int(Z, L, logit_softcap="30"), TypeError, r"logit_softcap must be a Python number or None"),
    (lambda: ce_int(Z, L, class_weights=jnp.ones(4)), ValueError, r"class_weights shape \(4,\) does not match the 3 classes"),
    (lambda: ce_soft(Z, Y, class_weights=jnp.ones(2)), ValueError, r"class_weights shape \(2,\) does not match the 3 classes"),
    (lambda: jaxce.nll_loss(Z, L, class_weights=jnp.ones((2, 3))), ValueError, r"class_weights shape \(2, 3\)"),
    (lambda: ce_int(Z, L, class_weights=jnp.ones(3, int)), TypeError, r"class_weights must have a real floating dtype"),
    (lambda: ce_int(Z, L, sample_weights=jnp.ones(3)), ValueError, r"sample_weights shape \(3,\) does not match the batch shape \(2,\)"),
    (lambda: ce_soft(Z, Y, sample_weights=jnp.ones((2, 3))), ValueError, r"sample_weights shape \(2, 3\) does not match the batch shape \(2,\)"),
    (lambda: jaxce.nll_loss(Z, L, sample_weights=jnp.ones(1)), ValueError, r"sample_weights shape \(1,\)"),
    (lambda: bce(Z, Y, sample_weights=jnp.ones(4)), ValueError, r"sample_weights shape \(4,\) is not broadcastable to logits shape \(2, 3\)"),
    (lambda: bce(Z, Y, pos_weight=jnp.ones(5)), ValueError, r"pos_weight shape \(5,\) is not broadcastable"),
    (lambda: bce(Z, jnp.ones((2, 4))), ValueError, r"labels shape \(2, 4\) does not broadcast with logits shape \(2, 3\)"),
    (lambda: ce_int(Z, L, ignore_index=1.0), TypeError, r"ignore_index must be a Python int or None, got 1.0"),
    (lambda: ce_soft(Z, Y, where=jnp.ones((2, 3), int)), TypeError, r"where must be a boolean mask, got dtype int32"),
    (lambda: ce_int(Z, L, where=jnp.ones(4, bool)), ValueError, r"where shape \(4,\) is not broadcastable to the input shape \(2, 3\)"),
    (lambda: jaxce.softmax_cross_entropy_hvp(Z, jnp.ones(3)), ValueError, r"v shape \(3,\) does not match logits shape \(2, 3\)"),
    (lambda: jaxce.softmax_cross_entropy_hvp(Z, jnp.ones((2, 3), int)), TypeError, r"v must have a real floating dtype"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_raises_under_jit():
    with pytest.raises(ValueError, match=r"labels shape \(3,\) does not match"):
        jax.jit(ce_int)(Z, jnp.array([0, 1, 2]))


# ------------------------------------------------------------------------------------------
# Issue 4: every option against the float64 reference of its documented formula

N, K = 5, 4
IGNORE = -100
CLASS_MASK = np.array([True, True, False, True])
W = np.array([0.5, 2.0, 1.0, 1.5], np.float32)
SW = np.array([1.0, 0.5, 2.0, 0.0, 1.5], np.float32)

OPTION_NAMES = {
    "eps": "label_smoothing",
    "cw": "class_weights",
    "sw": "sample_weights",
    "zl": "z_loss",
    "cap": "logit_softcap",
    "ignore": "ignore_index",
    "mask": "where",
    "reduction": "reduction",
    "base": "base",
}

OPTIONS = {
    "smoothing": dict(eps=0.1),
    "smoothing mean": dict(eps=0.2, reduction="mean"),
    "class weights": dict(cw=W),
    "class weights mean": dict(cw=W, reduction="mean"),
    "class weights sum": dict(cw=W, reduction="sum"),
    "sample weights mean": dict(sw=SW, reduction="mean"),
    "class and sample weights mean": dict(cw=W, sw=SW, reduction="mean"),
    "z-loss": dict(zl=1e-2),
    "z-loss big": dict(zl=0.5, reduction="mean"),
    "softcap": dict(cap=2.0),
    "z-loss + softcap": dict(zl=0.1, cap=1.5, reduction="sum"),
    "ignore_index mean": dict(ignore=IGNORE, reduction="mean"),
    "smoothing + ignore_index + class weights": dict(eps=0.1, ignore=IGNORE, cw=W, reduction="mean"),
    "class mask + smoothing": dict(mask=CLASS_MASK, eps=0.15),
    "everything, bits": dict(
        eps=0.1, cw=W, sw=SW, zl=1e-2, cap=3.0, ignore=IGNORE, mask=CLASS_MASK,
        reduction="mean", base=2,
    ),
}


def option_data(kw, integer, seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(N, K)) * 2).astype(np.float32)
    if integer:
        allowed = np.flatnonzero(CLASS_MASK) if "mask" in kw else np.arange(K)
        labels = rng.choice(allowed, size=N)
        if "ignore" in kw:
            labels[[1, 3]] = IGNORE
    else:
        labels = dirichlet(rng, (N, K)) * np.float32(1.0)
        labels[2] *= np.float32(0.6)  # a label that does not sum to 1
    return z, labels


def jaxce_options(kw, integer):
    out = {}
    for k, v in kw.items():
        if k == "ignore" and not integer:
            continue
        out[OPTION_NAMES[k]] = jnp.asarray(v) if isinstance(v, np.ndarray) else v
    return out


def ref_kw(kw, integer):
    return {k: v for k, v in kw.items() if integer or k != "ignore"}


@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_values(name, integer):
    kw = OPTIONS[name]
    z, labels = option_data(kw, integer)
    f = ce_int if integer else ce_soft
    out = jax.jit(lambda z, y: f(z, y, **jaxce_options(kw, integer)))(z, labels)
    rkw = ref_kw(kw, integer)
    ref = np_ref(z, labels, integer=integer, **{k: f64(v) if isinstance(v, np.ndarray) and k != "mask" else v for k, v in rkw.items()})
    assert out.dtype == jnp.float32 and out.shape == np.shape(ref)
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-6)


def ref_grads(z, labels, integer, kw):
    """Gradients of sum(reference) w.r.t. logits, soft labels and the weights, in float64."""
    kw = dict(kw)
    with jax.enable_x64(True):
        params = {"z": jnp.asarray(z, jnp.float64)}
        if not integer:
            params["labels"] = jnp.asarray(labels, jnp.float64)
        for name in ("cw", "sw"):
            if name in kw:
                params[name] = jnp.asarray(kw.pop(name), jnp.float64)
        fixed_labels = jnp.asarray(labels)

        def f(p):
            lab = p.get("labels", fixed_labels)
            extra = {n: p[n] for n in ("cw", "sw") if n in p}
            out = ref_ce(jnp, p["z"], lab, integer=integer, sg=jax.lax.stop_gradient, **extra, **kw)
            return jnp.sum(out)

        grads = jax.jit(jax.grad(f))(params)
        return {k: np.asarray(v, np.float64) for k, v in grads.items()}


@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_gradients_vs_plain_float64_composition(name, integer):
    kw = OPTIONS[name]
    z, labels = option_data(kw, integer, seed=1)
    rkw = ref_kw(kw, integer)
    expected = ref_grads(z, labels, integer, rkw)
    opts = jaxce_options({k: v for k, v in kw.items() if k not in ("cw", "sw")}, integer)
    params = {"z": jnp.asarray(z)}
    if not integer:
        params["labels"] = jnp.asarray(labels)
    for k in ("cw", "sw"):
        if k in kw:
            params[k] = jnp.asarray(kw[k])
    f = ce_int if integer else ce_soft

    def loss(p):
        out = f(
            p["z"], p.get("labels", labels),
            class_weights=p.get("cw"), sample_weights=p.get("sw"), **opts,
        )
        return jnp.sum(out)

    grads = jax.jit(jax.grad(loss))(params)
    assert set(grads) == set(expected)
    for k in expected:
        assert grads[k].dtype == jnp.float32
        np.testing.assert_allclose(grads[k], expected[k], rtol=2e-5, atol=2e-6, err_msg=k)


LOW_PRECISION_OPTIONS = {
    "plain": {},
    "smoothing + z-loss + class weights": dict(eps=0.1, zl=1e-2, cw=W),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
@pytest.mark.parametrize("name", list(LOW_PRECISION_OPTIONS))
@pytest.mark.parametrize("impossible", [False, True], ids=["finite", "-inf logit"])
def test_input_dtypes_fast_and_fallback_paths(name, integer, dtype, impossible):
    """Every dtype through both forward paths: the fast sums (no -inf logit; the label's logit
    within e^88 of the maximum except in row 1) and the exact ones (a -inf logit in row 0, an
    impossible class: smoothing puts no mass there). bf16 logits take the label's logit by
    its bits. Reference: float64 on the same (rounded) values, -inf read as a masked class."""
    kw = LOW_PRECISION_OPTIONS[name]
    z, labels = option_data({}, integer, seed=2)
    z[1] = [100.0, -60.0, 0.0, 3.0]  # row 1: a label on class 1 sits 160 below the maximum
    if integer:
        labels[:2] = [1, 1]
    else:
        labels[1] = [0.0, 1.0, 0.0, 0.0]
    if impossible:
        z[0, 2] = -np.inf
        if integer:
            labels[0] = 0
        else:
            labels[0] = [0.5, 0.25, 0.0, 0.25]
    z = np.asarray(jnp.asarray(z, dtype).astype(jnp.float32))  # the values the dtype holds
    rkw = dict(kw, mask=np.isfinite(z))
    f = ce_int if integer else ce_soft
    opts = jaxce_options({k: v for k, v in kw.items() if k != "cw"}, integer)
    cw = jnp.asarray(kw["cw"]) if "cw" in kw else None

    def loss(z):
        return jnp.sum(f(z, labels, class_weights=cw, **opts))

    value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(z, dtype))
    ref = np.sum(np_ref(z, labels, integer=integer, **{k: f64(v) if k == "cw" else v for k, v in rkw.items()}))
    np.testing.assert_allclose(value, ref, rtol=2e-6)
    expected = ref_grads(z, labels, integer, rkw)["z"]
    assert grad.dtype == dtype
    rtol, atol = (1e-6, 1e-7) if dtype == jnp.float32 else (1e-2, 1e-5)  # one 16-bit rounding
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_integer_loss_writes_no_copy_of_the_logits(dtype):
    """jit(value_and_grad) of the integer loss needs O(N) scratch: the label's logit shifts the
    normaliser (no max pass), bf16 logits are upcast inside the fused passes, never as a
    float32 copy (XLA:CPU writes out a convert that two fusions share)."""
    z = jax.ShapeDtypeStruct((256, 2048), dtype)
    y = jax.ShapeDtypeStruct((256,), jnp.int32)
    for opts in ({}, dict(label_smoothing=0.1, z_loss=1e-4, ignore_index=-100)):
        step = jax.jit(jax.value_and_grad(lambda z, y: ce_int(z, y, reduction="mean", **opts)))
        temp = step.lower(z, y).compile().memory_analysis().temp_size_in_bytes
        if not opts:
            assert temp < 64 * 256, (opts, temp)  # a few [N] vectors
        else:  # scratch of the exact smoothing sums (a cond branch, taken only for rows with
            # -inf logits): an upcast copy and the indicator, each [N, V] float32; no more
            assert temp <= 2 * 4 * 256 * 2048 + 64 * 256, (opts, temp)



@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
@pytest.mark.parametrize("opts", [
    dict(where="class"), dict(where="row"), dict(logit_softcap=30.0),
    dict(where="class", logit_softcap=30.0, label_smoothing=0.1),
], ids=["where-class", "where-example", "softcap", "where+softcap+smoothing"])
def test_options_keep_block_sized_scratch(integer, opts):
    """Masks and softcaps select logits that several passes share, which XLA:CPU writes out
    whole; in row blocks that scratch is a few 4 MiB blocks, not an [N, V] float32 array.
    Label smoothing with a mask or softcap still shares them (README): at most two arrays."""
    n, v = 4096, 4096  # the [N, V] float32 logits: 64 MiB
    masks = {"class": jnp.ones(v, bool), "row": jnp.ones(n, bool)}
    kw = {**opts, "where": masks.get(opts.get("where"))}
    z = jax.ShapeDtypeStruct((n, v), jnp.float32)
    y = jax.ShapeDtypeStruct((n,) if integer else (n, v), jnp.int32 if integer else jnp.float32)
    f = ce_int if integer else ce_soft
    step = jax.jit(jax.value_and_grad(lambda z, y: f(z, y, reduction="mean", **kw)))
    temp = step.lower(z, y).compile().memory_analysis().temp_size_in_bytes
    smoothing_shares = "label_smoothing" in opts
    bound = 2 * 4 * n * v + 8 * 2**20 if smoothing_shares else 7 * 4 * 2**20  # 80 MiB before
    assert temp <= bound, temp

@pytest.mark.parametrize("integer", [True, False], ids=["integer", "soft"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1, z_loss=1e-4)], ids=["plain", "options"])
def test_an_example_mask_costs_what_no_mask_costs(integer, dtype, opts):
    """A ``where`` of the batch shape leaves rows out as ignored labels do: the same scratch as
    without a mask (it had been broadcast to an [N, V] class mask, with the select forms' [N, V]
    scratch: 12 MiB and up here). The mask is an argument: a constant one would be folded."""
    n, v = 1024, 8192
    z = jax.ShapeDtypeStruct((n, v), dtype)
    y = jax.ShapeDtypeStruct((n,) if integer else (n, v), jnp.int32 if integer else dtype)
    rows = jax.ShapeDtypeStruct((n,), jnp.bool_)
    f = ce_int if integer else ce_soft
    loss = lambda z, y, where: f(z, y, where=where, reduction="mean", **opts)
    temp = lambda step, *args: step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    masked = temp(jax.jit(jax.value_and_grad(loss)), z, y, rows)
    plain = temp(jax.jit(jax.value_and_grad(lambda z, y: loss(z, y, None))), z, y)
    assert masked <= plain + 64 * n, (masked, plain)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_softcap_is_not_written_out(smoothing):
    """Without a mask the softcap keeps -inf by arithmetic, not a select (which XLA:CPU writes
    out before the row sums): the forward pass of float32 integer labels keeps at most a row
    block (it kept the capped [N, V] logits, 64 MiB here); with smoothing, whose sum shares
    the capped logits, two arrays (it kept three)."""
    n, v = 4096, 4096
    z = jax.ShapeDtypeStruct((n, v), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    loss = lambda z, y: ce_int(z, y, logit_softcap=30.0, label_smoothing=smoothing, reduction="mean")
    temp = jax.jit(loss).lower(z, y).compile().memory_analysis().temp_size_in_bytes
    bound = 4 * 2**20 + 64 * n if not smoothing else 2 * 4 * n * v + 4 * 2**20
    assert temp <= bound, temp


def test_class_weights_mean_is_pytorch_weighted_mean(rng):
    # PyTorch: sum_n w[y_n] * l_n / sum_n w[y_n] over the non-ignored n.
    z = rng.normal(size=(4, 3)).astype(np.float32)
    labels = np.array([0, 1, IGNORE, 1])
    w = np.array([3.0, 1.0, 0.5], np.float32)
    nll = sp.logsumexp(f64(z), -1) - f64(z)[np.arange(4), np.clip(labels, 0, 2)]
    keep = labels != IGNORE
    wy = f64(w)[np.clip(labels, 0, 2)]
    expected = (wy * nll)[keep].sum() / wy[keep].sum()
    out = ce_int(z, labels, class_weights=w, ignore_index=IGNORE, reduction="mean")
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(
        jaxce.nll_loss(jaxce.log_softmax(z), labels, class_weights=w, ignore_index=IGNORE, reduction="mean"),
        expected,
        rtol=1e-6,
    )


def test_smoothing_leaves_ignored_examples_ignored(rng):
    # torch issue 73205: smoothing once gave ignored rows a loss.
    z = rng.normal(size=(3, 4)).astype(np.float32)
    labels = np.array([IGNORE, 2, IGNORE])
    out = ce_int(z, labels, ignore_index=IGNORE, label_smoothing=0.3)
    np.testing.assert_array_equal(np.asarray(out)[[0, 2]], 0.0)
    g = jax.grad(lambda z: ce_int(z, labels, ignore_index=IGNORE, label_smoothing=0.3).sum())(z)
    np.testing.assert_array_equal(np.asarray(g)[[0, 2]], 0.0)
    # The counted row: (1 - eps) * nll + eps * mean over classes of -log p.
    lp = sp.log_softmax(f64(z[1]))
    np.testing.assert_allclose(out[1], -(0.7 * lp[2] + 0.3 * lp.mean()), rtol=1e-6)


def test_smoothing_skips_neg_inf_classes():
    # A -inf logit is an impossible class: no smoothing mass goes there, the loss is finite.
    z = jnp.array([2.0, -jnp.inf, 0.0, 1.0])
    lp = sp.log_softmax([2.0, 0.0, 1.0])
    expected = -(0.8 * lp[0] + 0.2 * lp.mean())
    v, g = jax.value_and_grad(ce_int)(z, jnp.array(0), label_smoothing=0.2)
    np.testing.assert_allclose(v, expected, rtol=1e-6)
    assert float(g[1]) == 0.0 and np.isfinite(np.asarray(g)).all()
    p = sp.softmax([2.0, 0.0, 1.0])
    t = np.array([0.8, 0.0, 0.0]) + 0.2 / 3
    np.testing.assert_allclose(np.asarray(g)[[0, 2, 3]], p - t, rtol=1e-5, atol=1e-7)


def test_z_loss_and_softcap_closed_forms():
    x = jnp.array([2.0, 1.0, 0.0])
    lse = sp.logsumexp([2.0, 1.0, 0.0])
    p = sp.softmax([2.0, 1.0, 0.0])
    y = np.eye(3)[0]
    v, g = jax.value_and_grad(ce_int)(x, jnp.array(0), z_loss=0.3)
    np.testing.assert_allclose(v, 0.40760596 + 0.3 * lse**2, rtol=1e-6)
    np.testing.assert_allclose(g, p * (1 + 2 * 0.3 * lse) - y, rtol=1e-5)
    c = 1.5
    zc = c * np.tanh(np.array([2.0, 1.0, 0.0]) / c)
    pc = sp.softmax(zc)
    v, g = jax.value_and_grad(ce_int)(x, jnp.array(0), logit_softcap=c)
    np.testing.assert_allclose(v, sp.logsumexp(zc) - zc[0], rtol=1e-6)
    np.testing.assert_allclose(g, (pc - y) * (1 - (zc / c) ** 2), rtol=1e-5, atol=1e-7)


def test_options_keep_edge_case_guarantees(rng):
    z = rng.normal(size=(3, 4)).astype(np.float32)
    z[0, 1] = -np.inf
    z[2, 2] = 1e4
    labels = np.array([0, IGNORE, 2])
    opts = dict(
        label_smoothing=0.1, class_weights=W, z_loss=1e-4, logit_softcap=5.0,
        ignore_index=IGNORE, reduction="mean",
    )
    v, g = jax.value_and_grad(lambda z: ce_int(z, labels, **opts))(z)
    assert np.isfinite(float(v)) and np.isfinite(np.asarray(g)).all()
    assert float(g[0, 1]) == 0.0
    np.testing.assert_array_equal(np.asarray(g)[1], 0.0)
    # All ignored: 0 with zero gradient, every option on.
    v, g = jax.value_and_grad(lambda z: ce_int(z, np.full(3, IGNORE), **opts))(z)
    assert float(v) == 0.0
    np.testing.assert_array_equal(g, 0.0)
    # Soft labels with a fully masked row and every option.
    y = dirichlet(rng, (3, 4))
    y[0, 1] = 0.0  # no label mass on the -inf class (that would be +inf, correctly)
    rows = np.array([True, False, True])
    soft_opts = {k: v for k, v in opts.items() if k != "ignore_index"}
    v, g = jax.value_and_grad(lambda z: ce_soft(z, y, where=rows, **soft_opts))(z)
    assert np.isfinite(float(v)) and np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[1], 0.0)
    # Under vmap.
    per = jax.vmap(lambda r, l: ce_int(r, l, **{**opts, "reduction": "none"}))(z, labels)
    np.testing.assert_allclose(per, ce_int(z, labels, **{**opts, "reduction": "none"}), rtol=1e-6)


def test_options_hessian_still_works(rng):
    z = rng.normal(size=(4,)).astype(np.float32)
    opts = dict(label_smoothing=0.1, z_loss=0.05)
    h = jax.jit(jax.hessian(lambda z: ce_int(z, jnp.array(1), **opts)))(z)
    with jax.enable_x64(True):
        ref = jax.jit(jax.hessian(
            lambda z: ref_ce(jnp, z[None], jnp.array([1]), integer=True, eps=0.1, zl=0.05).sum()
        ))(jnp.asarray(z, jnp.float64))
    np.testing.assert_allclose(h, np.asarray(ref), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# nll_loss


NLL_SHARED = {
    "plain": dict(),
    "where rows": dict(where=np.array([True, False, True, True, True])),
    "ignore mean": dict(ignore_index=IGNORE, reduction="mean"),
    "class weights mean": dict(class_weights=W, reduction="mean"),
    "sample weights sum": dict(sample_weights=SW, reduction="sum"),
    "all, hartleys": dict(
        ignore_index=IGNORE, class_weights=W, sample_weights=SW, reduction="mean", base=10
    ),
}


@pytest.mark.parametrize("name", list(NLL_SHARED))
def test_nll_of_log_softmax_equals_integer_cross_entropy(name):
    kw = NLL_SHARED[name]
    z, labels = option_data({"ignore": IGNORE}, integer=True, seed=3)
    kw = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    where = kw.get("where")
    nll = lambda z: jaxce.nll_loss(jaxce.log_softmax(z, where=where), labels, **kw)
    ce = lambda z: ce_int(z, labels, **kw)
    np.testing.assert_allclose(jax.jit(nll)(z), jax.jit(ce)(z), rtol=1e-6, atol=1e-7)
    g_nll = jax.jit(jax.grad(lambda z: jnp.sum(nll(z))))(z)
    g_ce = jax.jit(jax.grad(lambda z: jnp.sum(ce(z))))(z)
    np.testing.assert_allclose(g_nll, g_ce, rtol=1e-5, atol=1e-6)


def test_nll_on_arbitrary_log_probs(rng):
    lp = rng.normal(size=(4, 3)).astype(np.float32)  # need not be normalised
    labels = np.array([2, 0, IGNORE, 1])
    w = np.array([1.0, 2.0, 3.0], np.float32)
    out = jaxce.nll_loss(lp, labels, class_weights=w, ignore_index=IGNORE)
    idx = np.clip(labels, 0, 2)
    expected = np.where(labels != IGNORE, -f64(w)[idx] * f64(lp)[np.arange(4), idx], 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    g = jax.grad(lambda lp: jaxce.nll_loss(lp, labels, class_weights=w, ignore_index=IGNORE).sum())(lp)
    onehot = np.eye(3)[idx] * (labels != IGNORE)[:, None]
    np.testing.assert_allclose(g, -onehot * f64(w)[idx][:, None], rtol=1e-6)
    # Tuple axis: the flat C-order label.
    lp3 = rng.normal(size=(2, 2, 3)).astype(np.float32)
    out = jaxce.nll_loss(lp3, np.array([5, 1]), axis=(1, 2))
    np.testing.assert_allclose(out, [-lp3[0, 1, 2], -lp3[1, 0, 1]], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Hardening (issue 10): inputs the tests of the options did not choose.

INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32]


def softmax_rows(z):
    return sp.softmax(f64(z), axis=-1)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("num_classes", [5, 200, 256, 300])
@pytest.mark.parametrize("ignore_index", [None, -100, 255])
def test_every_integer_label_dtype_compares_exactly(dtype, num_classes, ignore_index):
    """K, the class offset and ignore_index are never converted into the labels' dtype
    (uint8: K = 256 would be 0 and -100 would be 156)."""
    top = min(num_classes, int(np.iinfo(dtype).max) + 1)
    labels = np.array([top - 1, 0, min(156, top - 1), 3], dtype)
    z = np.random.default_rng(num_classes).normal(size=(4, num_classes)).astype(np.float32)
    ignored = np.zeros(4, bool) if ignore_index is None else labels.astype(int) == ignore_index
    p = softmax_rows(z)
    onehot = np.eye(num_classes)[labels.astype(int)]
    expected = np.where(ignored, 0.0, -np.log(np.sum(p * onehot, -1)))
    out = ce_int(z, labels, ignore_index=ignore_index)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    g = jax.grad(lambda z: ce_int(z, labels, ignore_index=ignore_index).sum())(z)
    np.testing.assert_allclose(g, (p - onehot) * ~ignored[:, None], atol=1e-6)
    x, w = np.eye(4, dtype=np.float32), np.zeros((4, num_classes), np.float32)
    w[:, :] = z  # x @ w == z
    fused = jaxce.linear_softmax_cross_entropy(
        x, w, labels, ignore_index=ignore_index, reduction="none", block_size=3
    )
    np.testing.assert_allclose(fused, expected, rtol=1e-5)


def test_labels_beyond_int32_are_out_of_range_never_another_class():
    z = np.zeros((2, 3), np.float32)
    out = ce_int(z, np.array([2**32 - 1, 1], np.uint32), ignore_index=-1)
    assert np.isnan(out[0]) and out[1] == pytest.approx(math.log(3))  # not ignored: NaN
    with pytest.raises(ValueError, match="4294967297.*beyond int32"):
        ce_int(z, np.array([2**32 + 1, 0], np.int64))  # JAX would truncate it to class 1
    with jax.enable_x64():
        out = ce_int(z, np.array([2**32 + 1, 0], np.int64))
        assert np.isnan(out[0]) and out[1] == pytest.approx(math.log(3))


@pytest.mark.parametrize("dtype, ignore_index", [(np.uint64, 2**64 - 1), (np.int64, -(2**63)),
                                                 (np.uint32, 2**32 - 1)])
def test_ignore_index_at_the_edge_of_a_64_bit_dtype(dtype, ignore_index):
    """An ignore_index that only the labels' own dtype holds (2**64 - 1 for uint64) is compared
    in that dtype: as a Python int JAX could not parse it."""
    z = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    with jax.enable_x64(True):
        labels = np.array([2, ignore_index, 0], dtype)
        out = np.asarray(ce_int(z, labels, ignore_index=ignore_index))
        fused = jaxce.linear_softmax_cross_entropy(
            np.eye(3, dtype=np.float32), z, labels, ignore_index=ignore_index, reduction="none"
        )
    lse = sp.logsumexp(f64(z), axis=-1)
    expected = [lse[0] - z[0, 2], 0.0, lse[2] - z[2, 0]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(fused, expected, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_soft_labels_with_softcap_see_neg_inf_logits(eps):
    """The softcap maps -inf to the finite -c: the fast sums cannot tell an impossible class."""
    z = jnp.array([[0.5, -jnp.inf, -jnp.inf], [0.0, -jnp.inf, 1.0]])
    y = jnp.array([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]])
    out = ce_soft(z, y, logit_softcap=30.0, label_smoothing=eps)
    zc = 30.0 * np.tanh(np.array([0.0, 1.0]) / 30.0)
    t = (1 - eps) * np.array([0.5, 0.5]) + eps / 2
    np.testing.assert_allclose(out, [0.0, -np.sum(t * (zc - sp.logsumexp(zc)))], rtol=1e-6)
    assert np.isposinf(ce_soft(jnp.array([[0.0, -jnp.inf]]), jnp.array([[0.5, 0.5]]),
                               logit_softcap=30.0))[0]


def test_class_weight_zero_on_every_label_with_smoothing_has_an_undefined_mean():
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], np.float32)
    kw = dict(class_weights=jnp.array([0.0, 1.0, 1.0]), label_smoothing=0.2)
    total = ce_int(z, np.array([0, 0]), reduction="sum", **kw)
    assert total > 0  # the smoothing's mass on classes 1 and 2
    mean, g = jax.value_and_grad(lambda z: ce_int(z, np.array([0, 0]), reduction="mean", **kw))(z)
    assert np.isnan(mean) and np.all(np.isnan(g))  # x / 0, not a silent 0
    # Nothing counted at all (0 / 0) is still 0, with a zero gradient.
    v, g = jax.value_and_grad(
        lambda z: ce_int(z, np.array([0, 0]), reduction="mean", ignore_index=0, **kw))(z)
    assert v == 0.0 and np.all(g == 0.0)


@pytest.mark.parametrize("zl", [0.0, 0.1])
def test_aux_z_loss_of_a_fully_masked_row_is_zero(zl):
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], np.float32)
    _, aux = ce_int(z, np.array([0, 0]), where=np.array([True, False]), z_loss=zl, return_aux=True)
    lse = sp.logsumexp(f64(z[0]))
    np.testing.assert_allclose(aux["z_loss"], [zl * lse**2, 0.0], rtol=1e-6)
    out, aux = jaxce.linear_softmax_cross_entropy(  # every class masked: every row
        np.eye(2, 3, dtype=np.float32), np.ones((3, 3), np.float32), np.array([0, 0]),
        where=np.zeros(3, bool), z_loss=zl, return_aux=True, reduction="sum")
    assert out == 0.0
    np.testing.assert_array_equal(aux["z_loss"], [0.0, 0.0])


def test_all_neg_inf_row_with_a_label_has_probability_zero():
    z = np.array([[-np.inf] * 3, [0.0, 0.0, 1.0]], np.float32)
    labels = np.array([0, 0])
    out, aux = ce_int(z, labels, return_aux=True)
    assert np.isposinf(out[0]) and out[1] == pytest.approx(float(np_ref(z[1:], labels[1:],
                                                                         integer=True)[0]))
    np.testing.assert_array_equal(aux["correct"], [False, False])
    g = jax.grad(lambda z: ce_int(z, labels).sum())(z)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_allclose(g[1], softmax_rows(z[1]) - [1, 0, 0], atol=1e-6)
    nll = jaxce.nll_loss(jaxce.log_softmax(z), labels)
    assert np.isposinf(nll[0])  # as the NLL of the log-softmax says
    assert np.isposinf(ce_soft(z, np.eye(3, dtype=np.float32)[labels])[0])


def test_nan_sample_weight_on_an_ignored_row_takes_no_part():
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], np.float32)
    labels = np.array([-100, 2])
    sw = np.array([np.nan, 2.0], np.float32)
    f = lambda z, sw: ce_int(z, labels, ignore_index=-100, sample_weights=sw, reduction="mean")
    out, (gz, gsw) = jax.value_and_grad(f, argnums=(0, 1))(z, sw)
    np.testing.assert_allclose(out, np_ref(z[1:], labels[1:], integer=True)[0], rtol=1e-6)
    np.testing.assert_array_equal(gz[0], 0.0)
    assert gsw[0] == 0.0 and np.isfinite(gsw[1])


@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_out_of_range_label_has_a_nan_loss_and_a_nan_gradient(bad):
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]], np.float32)
    labels = np.array([bad, 2])
    for loss in (lambda z: ce_int(z, labels),
                 lambda z: jaxce.nll_loss(jaxce.log_softmax(z), labels)):
        out = loss(z)
        g = jax.grad(lambda z: loss(z).sum())(z)
        assert np.isnan(out[0]) and np.all(np.isnan(g[0])), (out, g)
        np.testing.assert_allclose(g[1], softmax_rows(z[1]) - [0, 0, 1], atol=1e-6)
    # The fused loss: dw = x^T dz mixes the rows, so the NaN row reaches all of dw (as x @ w's).
    fused = lambda w: jaxce.linear_softmax_cross_entropy(jnp.eye(2), w, labels, reduction="none")
    out, g = fused(z), jax.grad(lambda w: fused(w).sum())(z)
    assert np.isnan(out[0]) and np.isfinite(out[1]) and np.all(np.isnan(g))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batches(reduction):
    empty_z = np.zeros((0, 3), np.float32)
    cases = [
        lambda z: ce_int(z, np.zeros(0, np.int32), reduction=reduction, label_smoothing=0.1),
        lambda z: ce_soft(z, np.zeros((0, 3), np.float32), reduction=reduction),
        lambda z: jaxce.nll_loss(z, np.zeros(0, np.int32), reduction=reduction),
        lambda z: ce_int(z.astype(jnp.bfloat16), np.zeros(0, np.int32), reduction=reduction),
    ]
    for f in cases:
        out = f(empty_z)
        assert out.shape == ((0,) if reduction == "none" else ())
        if reduction != "none":
            assert out == 0.0
        g = jax.grad(lambda z: jnp.sum(f(z)))(empty_z)
        assert g.shape == (0, 3)
    x, w = np.zeros((2, 0, 4), np.float32), np.ones((4, 3), np.float32)
    out = jaxce.linear_softmax_cross_entropy(x, w, np.zeros((2, 0), int), reduction=reduction)
    assert out.shape == ((2, 0) if reduction == "none" else ())


def test_no_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"logits have no classes: axis -1 of shape \(2, 0\)"):
        ce_int(np.zeros((2, 0), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="no classes"):
        ce_soft(np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32))
    x, w = np.ones((4, 3), np.float32), np.ones((3, 0), np.float32)
    for reduction in ("none", "mean"):  # (the fused loss divided by 0 classes)
        with pytest.raises(ValueError, match=r"w has no classes: shape \(3, 0\)"):
            jaxce.linear_softmax_cross_entropy(x, w, np.zeros(4, int), reduction=reduction)


# ------------------------------------------------------------------------------------------
# return_aux


@pytest.mark.parametrize("base", [None, 2])
def test_return_aux_integer(rng, base):
    z = rng.normal(size=(4, 3)).astype(np.float32)
    z[2] = [0.0, 5.0, 1.0]  # argmax 1
    labels = np.array([int(np.argmax(z[0])), (int(np.argmax(z[1])) + 1) % 3, 1, IGNORE])
    cap, zl = 2.0, 0.1
    out, aux = ce_int(
        z, labels, ignore_index=IGNORE, z_loss=zl, logit_softcap=cap, base=base, return_aux=True
    )
    zc = cap * np.tanh(f64(z) / cap)
    lse = sp.logsumexp(zc, -1)
    assert set(aux) == {"logsumexp", "z_loss", "correct"}
    np.testing.assert_allclose(aux["logsumexp"], lse, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], zl * lse**2 / ln(base), rtol=1e-6)
    np.testing.assert_array_equal(aux["correct"], [True, False, True, False])
    assert aux["correct"].dtype == jnp.bool_
    ref = np_ref(z, labels, integer=True, ignore=IGNORE, zl=zl, cap=cap, base=base)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    # The loss without aux is the same.
    np.testing.assert_allclose(
        ce_int(z, labels, ignore_index=IGNORE, z_loss=zl, logit_softcap=cap, base=base), out
    )


def test_return_aux_soft_and_mean(rng):
    z = rng.normal(size=(3, 4)).astype(np.float32)
    y = dirichlet(rng, (3, 4))
    m = np.array([True, False, True, True])
    out, aux = ce_soft(z, y, where=m, z_loss=0.2, reduction="mean", return_aux=True)
    assert set(aux) == {"logsumexp", "z_loss"}
    lse = sp.logsumexp(np.where(m, f64(z), -np.inf), -1)
    np.testing.assert_allclose(aux["logsumexp"], lse, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], 0.2 * lse**2, rtol=1e-6)
    assert out.shape == ()
    np.testing.assert_allclose(out, np_ref(z, y, integer=False, mask=m, zl=0.2, reduction="mean"), rtol=1e-6)
    # Differentiating through the aux logsumexp: its gradient is softmax.
    g = jax.grad(lambda z: ce_soft(z, y, where=m, return_aux=True)[1]["logsumexp"].sum())(z)
    np.testing.assert_allclose(g, sp.softmax(np.where(m, f64(z), -np.inf), -1), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# softmax_cross_entropy_hvp


def test_hvp_vs_hessian_and_jvp_of_grad(rng):
    z = rng.normal(size=(5,)).astype(np.float32)
    v = rng.normal(size=(5,)).astype(np.float32)
    y = dirichlet(rng, (5,))
    hvp = jaxce.softmax_cross_entropy_hvp(z, v)
    p = sp.softmax(f64(z))
    np.testing.assert_allclose(hvp, (np.diag(p) - np.outer(p, p)) @ f64(v), rtol=1e-5, atol=1e-7)
    h = jax.jit(jax.hessian(ce_soft))(z, y)
    np.testing.assert_allclose(hvp, h @ v, rtol=1e-5, atol=1e-6)
    hvp_of = lambda f: jax.jit(lambda z, v: jax.jvp(jax.grad(f), (z,), (v,))[1])(z, v)
    np.testing.assert_allclose(hvp, hvp_of(lambda z: ce_soft(z, y)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hvp, hvp_of(lambda z: ce_int(z, jnp.array(3))), rtol=1e-5, atol=1e-6)
    assert hvp.dtype == jnp.float32


@pytest.mark.parametrize("junk", [np.nan, np.inf, -np.inf])
def test_hvp_ignores_v_on_impossible_classes(rng, junk):
    """H has a zero row and column for a masked class or a -inf logit: v's entry there takes
    no part, whatever it holds (it once spread NaN to every entry of the row)."""
    z = rng.normal(size=(3, 6)).astype(np.float32)
    z[1, 4] = -np.inf
    m = np.array([True, True, False, True, True, True])
    v = rng.normal(size=(3, 6)).astype(np.float32)
    impossible = ~m[None, :] | np.isneginf(z)
    v_junk = np.where(impossible, np.float32(junk), v)
    out = np.asarray(jaxce.softmax_cross_entropy_hvp(z, v_junk, where=m))
    p = sp.softmax(np.where(impossible, -np.inf, f64(z)), -1)
    vv = np.where(impossible, 0.0, f64(v))
    closed = p * vv - p * (p * vv).sum(-1, keepdims=True)
    np.testing.assert_allclose(out, closed, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out[impossible], 0.0)


def test_hvp_batch_where_and_tuple_axis(rng):
    z = rng.normal(size=(3, 2, 4)).astype(np.float32)
    v = rng.normal(size=(3, 2, 4)).astype(np.float32)
    labels = rng.integers(0, 8, size=3)
    out = jaxce.softmax_cross_entropy_hvp(z, v, axis=(1, 2))
    _, ref = jax.jvp(jax.grad(lambda z: ce_int(z, labels, (1, 2)).sum()), (z,), (v,))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    p = sp.softmax(f64(z).reshape(3, 8), -1)
    vv = f64(v).reshape(3, 8)
    closed = p * vv - p * (p * vv).sum(-1, keepdims=True)
    np.testing.assert_allclose(out, closed.reshape(3, 2, 4), rtol=1e-5, atol=1e-7)
    # A class mask: masked classes give 0.
    zz = z.reshape(3, 8)
    m = np.array([True, True, False, True, True, False, True, True])
    out = jaxce.softmax_cross_entropy_hvp(zz, vv.astype(np.float32), where=m)
    pm = sp.softmax(np.where(m, f64(zz), -np.inf), -1)
    closed = pm * vv - pm * (pm * vv).sum(-1, keepdims=True)
    np.testing.assert_allclose(out, closed, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(out)[:, ~m], 0.0)
    y = np.where(m, dirichlet(rng, (3, 8)), 0.0).astype(np.float32)
    y /= y.sum(-1, keepdims=True)
    _, ref = jax.jvp(jax.grad(lambda z: ce_soft(z, y, where=m).sum()), (zz,), (vv.astype(np.float32),))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# sigmoid_binary_cross_entropy options


def ref_bce(xp, z, y, *, beta=None, sw=None, eps=0.0, mask=None, reduction="none", base=None):
    y = (1 - eps) * y + eps / 2
    beta = 1.0 if beta is None else beta
    log_s = -xp.logaddexp(0.0, -z)  # log sigmoid
    log_1ms = -xp.logaddexp(0.0, z)  # log(1 - sigmoid)
    loss = -(beta * y * log_s + (1 - y) * log_1ms)
    shape = loss.shape
    m = xp.ones(shape, bool) if mask is None else xp.broadcast_to(mask, shape)
    loss = xp.where(m, loss, 0.0)
    norm = xp.ones(shape)
    if sw is not None:
        loss, norm = loss * sw, norm * sw
    if reduction == "sum":
        loss = xp.sum(loss)
    elif reduction == "mean":
        loss = xp.sum(loss) / xp.sum(xp.where(m, norm, 0.0))
    return loss / ln(base)


BCE_OPTIONS = {
    "pos_weight": dict(beta=np.array([1.0, 3.0, 0.5], np.float32)),
    "sample weights mean": dict(sw=np.array([[1.0, 2.0, 0.0]], np.float32), reduction="mean"),
    "smoothing": dict(eps=0.2),
    "where mean": dict(mask=np.array([[True, False, True], [True, True, False]]), reduction="mean"),
    "all, bits": dict(
        beta=np.array([2.0, 1.0, 0.5], np.float32),
        sw=np.array([[0.5], [2.0]], np.float32),
        eps=0.1,
        mask=np.array([True, True, False]),
        reduction="sum",
        base=2,
    ),
}
BCE_NAMES = {"beta": "pos_weight", "sw": "sample_weights", "eps": "label_smoothing", "mask": "where", "reduction": "reduction", "base": "base"}


@pytest.mark.parametrize("name", list(BCE_OPTIONS))
def test_bce_options_values_and_gradients(rng, name):
    kw = BCE_OPTIONS[name]
    z = (rng.normal(size=(2, 3)) * 2).astype(np.float32)
    y = rng.random((2, 3)).astype(np.float32)
    opts = {BCE_NAMES[k]: v for k, v in kw.items()}
    out = bce(z, y, **opts)
    ref = ref_bce(np, f64(z), f64(y), **{k: f64(v) if isinstance(v, np.ndarray) and k != "mask" else v for k, v in kw.items()})
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    # Gradients w.r.t. logits, labels, pos_weight and sample weights vs the float64 composition.
    params = {"z": z, "y": y}
    for k in ("beta", "sw"):
        if k in kw:
            params[k] = kw[k]
    fixed = {k: v for k, v in kw.items() if k not in ("beta", "sw")}
    grads = jax.grad(
        lambda p: jnp.sum(
            bce(p["z"], p["y"], pos_weight=p.get("beta"), sample_weights=p.get("sw"),
                **{BCE_NAMES[k]: v for k, v in fixed.items()})
        )
    )({k: jnp.asarray(v) for k, v in params.items()})
    with jax.enable_x64(True):
        expected = jax.grad(
            lambda p: jnp.sum(ref_bce(jnp, p["z"], p["y"], beta=p.get("beta"), sw=p.get("sw"), **fixed))
        )({k: jnp.asarray(v, jnp.float64) for k, v in params.items()})
    for k in params:
        np.testing.assert_allclose(grads[k], np.asarray(expected[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_bce_pos_weight_closed_form_gradient():
    z = jnp.array([0.3, -1.0])
    y = jnp.array([1.0, 0.25])
    beta = 3.0
    g = jax.grad(lambda z: bce(z, y, pos_weight=jnp.array(beta)).sum())(z)
    s = sp.expit(np.array([0.3, -1.0]))
    yy = np.array([1.0, 0.25])
    np.testing.assert_allclose(g, s * (beta * yy + 1 - yy) - beta * yy, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# sigmoid_binary_cross_entropy: masked elements take no part, whatever they hold

SIGMOID_MASK = np.array([[True, False, True], [False, True, True]])


@pytest.mark.parametrize("junk", [np.nan, np.inf, -np.inf, -1.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_where_masks_junk_in_value_and_gradient(rng, junk, reduction):
    m = SIGMOID_MASK
    params = {
        "z": rng.normal(size=(2, 3)) * 2,
        "y": rng.random((2, 3)),
        "beta": np.array([[2.0, 1.0, 0.5], [1.0, 3.0, 0.25]]),
        "sw": rng.random((2, 3)) + 0.5,
    }
    junky = {k: jnp.asarray(np.where(m, v, junk), jnp.float32) for k, v in params.items()}
    opts = dict(eps=0.1, mask=m, reduction=reduction, base=2)
    f = lambda p: jnp.sum(
        bce(p["z"], p["y"], pos_weight=p["beta"], sample_weights=p["sw"], where=m,
            label_smoothing=0.1, reduction=reduction, base=2)
    )
    value, grads = jax.value_and_grad(f)(junky)
    # The float64 reference sees finite values (0.5) in the masked elements: they take no part.
    with jax.enable_x64(True):
        filled = {k: jnp.asarray(np.where(m, v, 0.5)) for k, v in params.items()}
        ref = lambda p: jnp.sum(ref_bce(jnp, p["z"], p["y"], beta=p["beta"], sw=p["sw"], **opts))
        ref_value, ref_grads = jax.value_and_grad(ref)(filled)
    np.testing.assert_allclose(value, float(ref_value), rtol=1e-6)
    for k in params:
        np.testing.assert_array_equal(np.asarray(grads[k])[~m], 0.0, err_msg=k)
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sigmoid_checked_mode_skips_masked_elements():
    z = np.array([0.5, np.nan, -1.0], np.float32)
    y = np.array([1.0, 2.0, 0.0], np.float32)
    m = np.array([True, False, True])
    out = jaxce.checked(bce)(z, y, where=m)
    np.testing.assert_allclose(out, [np.logaddexp(0, -0.5), 0.0, np.logaddexp(0, -1.0)], rtol=1e-6)
    with pytest.raises(jaxce.CheckError, match=r"logits\[1\] is nan"):
        jaxce.checked(bce)(z, np.array([1.0, 0.0, 0.0], np.float32))
    with pytest.raises(jaxce.CheckError, match=r"labels\[1\] = 2 is outside \[0, 1\]"):
        jaxce.checked(bce)(np.zeros(3, np.float32), y, where=~m)


# ------------------------------------------------------------------------------------------
# Option values: any concrete real scalar (Python, NumPy, JAX); no bool, string, array or tracer

Z_OPT = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]], np.float32)
L_OPT = np.array([1, 2], np.int32)
Y_OPT = np.array([[0.2, 0.5, 0.3], [0.0, 0.1, 0.9]], np.float32)
X_LIN = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(4, 3)
W_LIN = np.linspace(-2.0, 1.0, 15, dtype=np.float32).reshape(3, 5)
LABELS_LIN = np.array([0, 4, 2, 1], np.int32)


def linear_with(**option):
    """Value and gradients of the fused loss (gradient_filter only shows in the gradients)."""
    f = lambda x, w: jaxce.linear_softmax_cross_entropy(x, w, LABELS_LIN, reduction="sum", **option)
    return jax.value_and_grad(f, (0, 1))(X_LIN, W_LIN)


STATIC_OPTIONS = [  # (option, call with a value, a fractional value or None, an integer value)
    ("label_smoothing", lambda v: ce_int(Z_OPT, L_OPT, label_smoothing=v), 0.25, 0),
    ("label_smoothing", lambda v: bce(Z_OPT, Y_OPT, label_smoothing=v), 0.25, 0),
    ("z_loss", lambda v: ce_soft(Z_OPT, Y_OPT, z_loss=v), 0.25, 1),
    ("logit_softcap", lambda v: ce_int(Z_OPT, L_OPT, logit_softcap=v), 1.5, 2),
    ("base", lambda v: ce_soft(Z_OPT, Y_OPT, base=v), 2.5, 2),
    ("base", lambda v: bce(Z_OPT, Y_OPT, base=v), 2.5, 2),
    ("base", lambda v: jaxce.entropy(Y_OPT, base=v), 2.5, 10),
    ("gradient_filter", lambda v: linear_with(gradient_filter=v), 0.25, 1),
    ("block_size", lambda v: linear_with(block_size=v), None, 3),
    ("ignore_index", lambda v: ce_int(Z_OPT, L_OPT, ignore_index=v), None, 1),
    ("ignore_index", lambda v: linear_with(ignore_index=v), None, 4),
]
OPTION_IDS = [f"{o[0]}-{i}" for i, o in enumerate(STATIC_OPTIONS)]
REAL_KINDS = {
    "np.float32": np.float32,
    "np.float64": np.float64,
    "np 0-d": np.array,
    "jnp.float32": jnp.float32,
    "jnp 0-d": jnp.asarray,
}
INT_KINDS = {
    "python int": int,
    "np.int64": np.int64,
    "np.int32": np.int32,
    "np 0-d int": lambda v: np.array(v, np.int64),
    "jnp.int32": jnp.int32,
    "jnp 0-d int": jnp.asarray,
}


@pytest.mark.parametrize("option", STATIC_OPTIONS, ids=OPTION_IDS)
def test_option_values_accept_concrete_real_scalars(option):
    name, call, fractional, integer = option
    cases = [(kind(integer), integer) for kind in INT_KINDS.values()]
    if fractional is not None:  # a real option: also every float kind, and the int as a float
        cases += [(kind(fractional), fractional) for kind in REAL_KINDS.values()]
        cases = [(value, float(plain)) for value, plain in cases]
    for value, plain in cases:
        jax.tree.map(np.testing.assert_array_equal, call(value), call(plain))


@pytest.mark.parametrize("option", STATIC_OPTIONS, ids=OPTION_IDS)
def test_option_values_reject_bools_strings_arrays(option):
    name, call, fractional, integer = option
    bad = [True, np.bool_(False), jnp.asarray(True), str(integer), np.array([integer] * 2),
           jnp.asarray([integer] * 2), complex(integer, 1)]
    if fractional is None:  # an integer option: no float, even an integral one
        bad += [2.5, float(integer), np.float32(integer), jnp.float32(integer)]
    for value in bad:
        with pytest.raises(TypeError, match=f"^{name} must be a Python (number|int)"):
            call(value)


@pytest.mark.parametrize("option", STATIC_OPTIONS, ids=OPTION_IDS)
def test_option_traced_value_is_rejected_as_not_static(option):
    name, call, fractional, integer = option
    with pytest.raises(TypeError, match=f"^{name} must be static .* got the traced value"):
        jax.jit(call)(integer if fractional is None else fractional)


@pytest.mark.parametrize("axis", [(3, 2), (-1, -2), (2, 0), (3, 0, 1)])
def test_tuple_axis_out_of_order_flattens_in_the_order_given(rng, axis):
    # As optax: the label is a C-order index into the class axes as listed (axis 3 major in
    # (3, 2)); the soft-label loss, a sum over the same classes, does not depend on the order.
    z = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    axes = tuple(a % 4 for a in axis)
    batch = tuple(d for i, d in enumerate(z.shape) if i not in axes)
    y = rng.integers(0, math.prod(z.shape[a] for a in axes), size=batch)
    np.testing.assert_allclose(
        ce_int(z, y, axis), optax.softmax_cross_entropy_with_integer_labels(z, y, axis), **F32
    )
    grad = jax.grad(lambda z: jnp.sum(ce_int(z, y, axis)))(z)
    optax_ce = optax.softmax_cross_entropy_with_integer_labels
    expected = jax.grad(lambda z: jnp.sum(optax_ce(z, y, axis)))(z)
    np.testing.assert_allclose(grad, expected, **F32)
    soft = jax.nn.softmax(jnp.asarray(rng.normal(size=z.shape)), axis=axes)
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy(z, soft, axis),
        jaxce.softmax_cross_entropy(z, soft, tuple(sorted(axes))),
        **F32,
    )
    # the Jacobian's class shape follows the order given too
    class_shape = tuple(z.shape[a] for a in axes)
    assert jaxce.softmax_jacobian(z, axis).shape == batch + class_shape + class_shape


def test_tuple_axis_out_of_order_is_refused_with_class_axis_name():
    with pytest.raises(ValueError, match=r"increasing order with class_axis_name"):
        ce_int(jnp.zeros((2, 3, 4)), jnp.zeros((2,), jnp.int32), (2, 1), class_axis_name="model")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("path", ["int", "soft", "sparse", "fused int", "fused sparse"])
def test_float64_weights_on_narrower_logits(path, dtype, smoothing):
    """With x64 on, float64 class, sample and label weights (a NumPy array is float64) on
    float32 or bfloat16 logits give the float64 reference's value, and each weight's gradient
    comes back in its own dtype (the loss's arithmetic takes the logits' compute dtype: with
    smoothing, mixing them once raised a TypeError from a cond's branches)."""
    rng = np.random.default_rng(3)
    n, k, d = 6, 5, 4
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(n, d)), dtype)
        w = jnp.asarray(rng.normal(size=(d, k)), dtype)
        fused = path.startswith("fused")
        z = None if fused else jnp.asarray(3.0 * rng.normal(size=(n, k)), dtype)
        class_w = rng.uniform(0.5, 2.0, k)  # float64
        sample_w = rng.uniform(0.5, 2.0, n)
        labels = rng.integers(0, k, n)
        entries = rng.integers(0, k, (n, 2))
        entry_w = rng.uniform(0.1, 1.0, (n, 2))
        opts = dict(label_smoothing=smoothing, reduction="mean")
        if path.endswith("sparse"):
            dense = np.zeros((n, k))
            np.add.at(dense, (np.arange(n)[:, None], entries), entry_w)
        elif path == "soft":
            dense = rng.dirichlet(np.ones(k), n)

        def loss(class_w, sample_w, entry_w):
            if path == "int":
                return jaxce.softmax_cross_entropy_with_integer_labels(
                    z, labels, class_weights=class_w, sample_weights=sample_w, **opts)
            if path == "soft":
                return jaxce.softmax_cross_entropy(
                    z, dense, class_weights=class_w, sample_weights=sample_w, **opts)
            if path == "sparse":
                return jaxce.softmax_cross_entropy_with_sparse_labels(
                    z, entries, entry_w, class_weights=class_w, sample_weights=sample_w, **opts)
            labels_in = labels if path == "fused int" else entries
            label_w = None if path == "fused int" else entry_w
            return jaxce.linear_softmax_cross_entropy(
                x, w, labels_in, label_weights=label_w, class_weights=class_w,
                sample_weights=sample_w, **opts)

        weights = tuple(jnp.asarray(a) for a in (class_w, sample_w, entry_w))
        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(*weights)
        logits = np.asarray(z if not fused else x.astype(jnp.float64) @ w.astype(jnp.float64),
                            np.float64)
    target = labels if path.endswith("int") else dense
    ref = reference(logits, target, integer=path.endswith("int"), class_weights=class_w,
                    sample_weights=sample_w, label_smoothing=smoothing, reduction="mean")
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert value.dtype == jnp.float64
    assert abs(float(value) - ref["value"]) <= tol * abs(ref["value"]) + float(ref["value_atol"])
    for grad, given in zip(grads, weights):
        assert grad.dtype == given.dtype == jnp.float64
        assert np.all(np.isfinite(np.asarray(grad)))
