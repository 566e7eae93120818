"""Sparse labels: ``softmax_cross_entropy_with_sparse_labels`` and
``linear_softmax_cross_entropy(..., label_weights=...)``.

The semantics are those of ``softmax_cross_entropy`` on the dense labels that scatter-add the
k weights at their indices, so the matrix compares every path (in place, fused, inside
``shard_map`` on 8 simulated devices) with the float64 NumPy reference of the soft-label loss
(tests/_reference.py) on those dense labels: values, aux, and the gradients of the logits
(x, w and bias for the fused path), the label weights (the dense labels' gradient at each
entry's class) and the class and sample weights. The label weights' gradient is also checked
against autodiff of a plain ``jax.numpy`` dense loss in float64; then the edge cases.
"""

import contextlib
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import C, reference  # tests/ is on sys.path (pytest's rootdir insertion)
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxce

sparse_ce = jaxce.softmax_cross_entropy_with_sparse_labels
N, K, D = 8, 16, 5  # the sharded path splits N over 2 devices and K over 4
MESH, DATA, MODEL = (2, 4), "data", "model"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def dense_labels(indices, weights, num_classes):
    """The scatter-add of the weights at their indices; entries outside [0, K) are dropped."""
    indices, weights = np.asarray(indices), np.asarray(weights, np.float64)
    dense = np.zeros(indices.shape[:-1] + (num_classes,))
    valid = (indices >= 0) & (indices < num_classes)
    rows = np.broadcast_to(np.arange(indices.shape[0])[:, None], indices.shape)
    np.add.at(dense, (rows[valid], indices[valid]), weights[valid])
    return dense


def at_entries(dense, indices):
    """``dense[n, indices[n, j]]``, 0 for an index outside [0, K)."""
    valid = (indices >= 0) & (indices < dense.shape[-1])
    picked = np.take_along_axis(dense, np.where(valid, indices, 0), axis=-1)
    return np.where(valid, picked, 0.0)


# ----------------------------------------------------------------------------------------------
# The matrix: options x dtypes x k x paths.

OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "class_weights": {"class_weights": True},
    "z_loss_aux": {"z_loss": 0.01, "return_aux": True},
    "softcap": {"logit_softcap": 4.0},
    "class_mask": {"where": "class"},
    "row_mask": {"where": "rows"},  # a [N, K] mask with a fully masked row: in place only
    "sample_weights_mean": {"sample_weights": True, "reduction": "mean"},
    "base_sum": {"base": 2, "reduction": "sum"},
    "all": {
        "label_smoothing": 0.1, "class_weights": True, "z_loss": 0.01, "logit_softcap": 4.0,
        "where": "class", "sample_weights": True, "reduction": "mean", "return_aux": True,
    },
}
PATHS = ("inplace", "fused", "sharded", "sharded-fused")
KS = (1, 3, 32)


def matrix_cases():
    for option, dtype, k, path in itertools.product(OPTIONS, DTYPES, KS, PATHS):
        if path.endswith("fused") and OPTIONS[option].get("where") == "rows":
            continue  # the fused loss takes a class mask only
        if path == "sharded-fused" and (dtype != "float32" or k != 3):
            continue  # a few: its parts are the fused path's and the sharded path's
        yield pytest.param(option, dtype, k, path, id=f"{option}-{dtype}-k{k}-{path}")


def _round(a, dtype):
    return np.asarray(np.asarray(a, np.float64).astype(DTYPES[dtype]), np.float64)


def make_inputs(option, dtype, k, path):
    rng = np.random.default_rng(zlib.crc32(f"{option}-{dtype}-{k}-{path}".encode()))
    opts = OPTIONS[option]
    a = {"indices": rng.integers(0, K, (N, k))}
    weights = rng.uniform(0.1, 1.0, (N, k))
    if k > 1:  # padding: index -1 (or far out of range), weight 0
        pad = rng.random((N, k)) < 0.25
        pad[1, -1] = True
        pad[0, 0] = False  # (the class mask masks this entry's class)
        a["indices"] = np.where(pad, rng.choice([-1, -7, K + 3], (N, k)), a["indices"])
        weights = np.where(pad, 0.0, weights)
    if k > 2:  # duplicates add up
        a["indices"][2, :3] = rng.integers(0, K)
        weights[2, :3] = rng.uniform(0.1, 1.0, 3)
    a["weights"] = _round(weights, dtype)
    if path.endswith("fused"):
        a["x"] = _round(rng.standard_normal((N, D)), dtype)
        a["w"] = _round(rng.standard_normal((D, K)), dtype)
        a["bias"] = _round(rng.standard_normal(K), dtype)
        a["z"] = a["x"] @ a["w"] + a["bias"]
        eps = 2.0**-53 if dtype == "float64" else 2.0**-24
        a["logit_error"] = eps * C * (np.abs(a["x"]) @ np.abs(a["w"]) + np.abs(a["bias"]))
    else:
        a["z"] = _round(3.0 * rng.standard_normal((N, K)), dtype)
    a["where"] = None
    a["mask"] = np.ones((N, K), bool)
    if opts.get("where") == "class":
        a["where"] = rng.random(K) > 0.3
        a["where"][a["indices"][0, 0]] = False  # an entry on a masked class takes no part
        a["mask"] = np.broadcast_to(a["where"], (N, K))
    elif opts.get("where") == "rows":
        a["where"] = rng.random((N, K)) > 0.3
        a["where"][5] = False  # a fully masked row: loss 0, not counted
        a["mask"] = a["where"]
    a["class_weights"] = rng.uniform(0.5, 2.0, K) if opts.get("class_weights") else None
    a["sample_weights"] = rng.uniform(0.5, 2.0, N) if opts.get("sample_weights") else None
    reduction = opts.get("reduction", "none")
    a["cotangent"] = rng.standard_normal(N) if reduction == "none" else None
    return a


def _kwargs(option):
    kw = {k: v for k, v in OPTIONS[option].items()
          if k not in ("where", "class_weights", "sample_weights")}
    kw.setdefault("reduction", "none")
    return kw


def build(option, dtype, k, path, a):
    """``(diff, jitted run(diff) -> (loss, aux, grads))``."""
    dt = DTYPES[dtype]
    fused, sharded = path.endswith("fused"), path.startswith("sharded")
    diff = {"label_weights": jnp.asarray(a["weights"], dt)}
    if fused:
        diff.update({name: jnp.asarray(a[name], dt) for name in ("x", "w", "bias")})
    else:
        diff["logits"] = jnp.asarray(a["z"], dt)
    for name in ("class_weights", "sample_weights"):
        if a[name] is not None:
            diff[name] = jnp.asarray(a[name])
    rest = {"indices": jnp.asarray(a["indices"], jnp.int32)}
    if a["where"] is not None:
        where = jnp.asarray(a["where"])
        rest["where"] = where if fused or where.ndim == 2 else where[None, :]
    kw = _kwargs(option)
    out_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    cot = jnp.ones((), out_dtype) if a["cotangent"] is None else jnp.asarray(a["cotangent"], out_dtype)

    def loss(diff, rest, **axes):
        extra = {n: diff[n] for n in ("class_weights", "sample_weights") if n in diff}
        if "where" in rest:
            extra["where"] = rest["where"]
        if fused:
            out = jaxce.linear_softmax_cross_entropy(
                diff["x"], diff["w"], rest["indices"], label_weights=diff["label_weights"],
                bias=diff["bias"], block_size=4, **kw, **extra, **axes,
            )
        else:
            out = sparse_ce(diff["logits"], rest["indices"], diff["label_weights"], **kw,
                            **extra, **axes)
        return out if kw.get("return_aux") else (out, None)

    if sharded:
        mesh = Mesh(np.array(jax.devices()[:8]).reshape(MESH), (DATA, MODEL))
        specs = {
            "logits": P(DATA, MODEL), "x": P(DATA), "w": P(None, MODEL), "bias": P(MODEL),
            "label_weights": P(DATA), "indices": P(DATA), "class_weights": P(MODEL),
            "sample_weights": P(DATA),
            "where": P(MODEL) if fused else (P(None, MODEL) if option != "row_mask" else
                                             P(DATA, MODEL)),
        }
        row = P(DATA)
        out_spec = row if kw["reduction"] == "none" else P()
        aux_spec = {"logsumexp": row, "z_loss": row} if kw.get("return_aux") else None

        def loss_fn(diff):
            local = lambda diff, rest: loss(diff, rest, class_axis_name=MODEL,
                                            batch_axis_name=DATA)
            return jax.shard_map(
                local, mesh=mesh,
                in_specs=({n: specs[n] for n in diff}, {n: specs[n] for n in rest}),
                out_specs=(out_spec, aux_spec),
            )(diff, rest)
    else:
        loss_fn = lambda diff: loss(diff, rest)

    def run(diff):
        out, vjp, aux = jax.vjp(loss_fn, diff, has_aux=True)
        (grads,) = vjp(cot)
        return out, aux, grads

    return diff, jax.jit(run)


def assert_matches(what, actual, expected, atol, rtol, checked=None):
    """NaN meets NaN, an infinity the same infinity, else |a - e| <= atol + rtol |e|."""
    act = np.asarray(np.asarray(actual).astype(np.float64))
    exp = np.asarray(expected, np.float64)
    assert act.shape == exp.shape, (what, act.shape, exp.shape)
    atol = np.broadcast_to(np.asarray(atol, np.float64), act.shape)
    with np.errstate(all="ignore"):
        ok = np.where(np.isnan(exp), np.isnan(act), np.where(
            np.isinf(exp), act == exp,
            np.isfinite(act) & (np.abs(act - exp) <= atol + rtol * np.abs(exp))))
    if checked is not None:
        ok |= ~np.broadcast_to(checked, act.shape)
    if not ok.all():
        bad = [tuple(i) for i in np.argwhere(~ok)[:4]] if act.ndim else [()]
        lines = [f"  {i}: expected {exp[i]!r} (atol {atol[i]:.3g}), got {act[i]!r}" for i in bad]
        pytest.fail(f"{what}: {int((~ok).sum())} of {ok.size} differ\n" + "\n".join(lines))


@pytest.mark.parametrize("option,dtype,k,path", list(matrix_cases()))
def test_matrix(option, dtype, k, path):
    a = make_inputs(option, dtype, k, path)
    opts = OPTIONS[option]
    x64 = dtype == "float64"
    eps_c = 2.0**-53 if x64 else 2.0**-24
    eps_out = float(jnp.finfo(DTYPES[dtype]).eps)  # one ulp of the gradients' dtype
    tiny = float(jnp.finfo(np.float64 if x64 else np.float32).tiny)
    reduction = opts.get("reduction", "none")
    # (masked soft labels take no part in jaxce.softmax_cross_entropy, as in optax: the
    # reference, written for labels that are 0 there, gets them zeroed)
    dense = np.where(a["mask"], dense_labels(a["indices"], a["weights"], K), 0.0)
    ref = reference(
        a["z"], dense, integer=False, mask=a["mask"],
        class_weights=a["class_weights"], sample_weights=a["sample_weights"],
        label_smoothing=opts.get("label_smoothing", 0.0), z_loss=opts.get("z_loss", 0.0),
        cap=opts.get("logit_softcap"), base=opts.get("base"), reduction=reduction,
        cotangent=a["cotangent"], eps=eps_c, logit_error=a.get("logit_error"),
    )
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
        diff, run = build(option, dtype, k, path, a)
        out, aux, grads = jax.device_get(run(diff))
    out_dtype = np.float64 if x64 else np.float32
    assert out.dtype == out_dtype
    assert_matches("loss", out, ref["value"], ref["value_atol"], 4 * eps_c)
    if opts.get("return_aux"):
        assert set(aux) == {"logsumexp", "z_loss"}  # soft labels' aux: no "correct"
        assert_matches("aux logsumexp", aux["logsumexp"], ref["aux_lse"], ref["aux_lse_atol"],
                       4 * eps_c)
        assert_matches("aux z_loss", aux["z_loss"], ref["aux_z"], ref["aux_z_atol"], 4 * eps_c)
    for name, g in grads.items():
        assert g.dtype == diff[name].dtype, (name, g.dtype)
    dz, dz_atol = ref["dz"], ref["dz_atol"] + tiny
    if path.endswith("fused"):
        x, w = a["x"], a["w"]
        dz_tol = dz_atol + eps_out * np.abs(dz)  # dz rounded to the inputs' dtype for the matmuls
        assert_matches("dx", grads["x"], dz @ w.T,
                       dz_tol @ np.abs(w).T + C * eps_c * (np.abs(dz) @ np.abs(w).T), eps_out)
        assert_matches("dw", grads["w"], x.T @ dz,
                       np.abs(x).T @ dz_tol + C * eps_c * (np.abs(x).T @ np.abs(dz)), eps_out)
        assert_matches("dbias", grads["bias"], dz.sum(0), dz_tol.sum(0), eps_out)
    else:
        assert_matches("dlogits", grads["logits"], dz, dz_atol, eps_out)
    # d loss / d a_j is the dense labels' gradient at the entry's class (0 off [0, K))
    indices = a["indices"]
    assert_matches(
        "dlabel_weights", grads["label_weights"], at_entries(ref["dlabels"], indices),
        at_entries(ref["dlabels_atol"], indices) + tiny, eps_out,
        checked=at_entries(ref["dlabels_checked"].astype(float), indices) > 0,
    )
    padding = (indices < 0) | (indices >= K)
    assert np.all(np.asarray(grads["label_weights"], np.float64)[padding] == 0.0)
    if "sample_weights" in grads:
        assert_matches("dsample_weights", grads["sample_weights"], ref["dsw"], ref["dsw_atol"],
                       4 * eps_c)
    if "class_weights" in grads:
        assert_matches("dclass_weights", grads["class_weights"], ref["dcw"], ref["dcw_atol"],
                       4 * eps_c)


# ----------------------------------------------------------------------------------------------
# The label weights' gradient against autodiff of a plain jax.numpy dense loss, in float64.


def dense_jnp_loss(logits, indices, weights, *, label_smoothing=0.0, class_weights=None,
                   z_loss=0.0, logit_softcap=None, where=None):
    """Per-example soft-label cross-entropy of the scattered dense labels, plain jax.numpy."""
    num_classes = logits.shape[-1]
    valid = (indices >= 0) & (indices < num_classes)
    rows = jnp.arange(indices.shape[0])[:, None]
    y = jnp.zeros(logits.shape, weights.dtype).at[rows, jnp.where(valid, indices, 0)].add(
        jnp.where(valid, weights, 0.0))
    z = logits if logit_softcap is None else logit_softcap * jnp.tanh(logits / logit_softcap)
    mask = jnp.ones(logits.shape, bool) if where is None else jnp.broadcast_to(where, z.shape)
    y = jnp.where(mask, y, 0.0)
    if label_smoothing:
        count = jnp.sum(mask, axis=-1, keepdims=True)
        y = (1 - label_smoothing) * y + jnp.where(mask, label_smoothing / count, 0.0)
    if class_weights is not None:
        y = y * class_weights
    log_p = jax.nn.log_softmax(jnp.where(mask, z, -jnp.inf), axis=-1)
    lse = jax.nn.logsumexp(jnp.where(mask, z, -jnp.inf), axis=-1)
    return -jnp.sum(jnp.where(mask, y * log_p, 0.0), axis=-1) + z_loss * lse**2


@pytest.mark.parametrize("options", [
    {},
    {"label_smoothing": 0.2, "class_weights": True},
    {"z_loss": 0.05, "logit_softcap": 3.0},
    {"where": True, "label_smoothing": 0.1},
], ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("path", ["inplace", "fused"])
def test_label_weight_gradient_matches_autodiff_of_dense_float64(rng, options, path):
    k = 4
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((N, D)))
        w = jnp.asarray(rng.standard_normal((D, K)))
        logits = x @ w
        indices = jnp.asarray(rng.integers(0, K, (N, k))).at[0, 1].set(-1).at[3, 2].set(K + 2)
        weights = jnp.asarray(rng.uniform(0.1, 1.0, (N, k))).at[0, 1].set(0.0).at[3, 2].set(0.0)
        kw = dict(options)
        if kw.pop("class_weights", False):
            kw["class_weights"] = jnp.asarray(rng.uniform(0.5, 2.0, K))
        if kw.pop("where", False):
            kw["where"] = jnp.asarray(rng.random(K) > 0.3).at[indices[1, 0]].set(False)
        ct = jnp.asarray(rng.standard_normal(N))
        expected = jax.grad(lambda a: ct @ dense_jnp_loss(logits, indices, a, **kw))(weights)
        if path == "inplace":
            f = lambda a: ct @ sparse_ce(logits, indices, a, **kw)
        else:
            f = lambda a: ct @ jaxce.linear_softmax_cross_entropy(
                x, w, indices, label_weights=a, reduction="none", block_size=3, **kw)
        actual = jax.grad(f)(weights)
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)
        assert actual[0, 1] == 0 and actual[3, 2] == 0  # padding
        if "where" in kw:
            assert actual[1, 0] == 0  # an entry on a masked class takes no part


# ----------------------------------------------------------------------------------------------
# Edge cases.

LOGITS = np.array([[2.0, 1.0, 0.0, -1.0], [0.5, -0.5, 3.0, 1.0], [1.0, 2.0, 3.0, 4.0]],
                  np.float32)


def test_reference_numbers():
    """REFERENCE.md: softmax([2, 1, 0]), label 0 gives 0.40760596 nats, label 1 1.40760596."""
    z = jnp.array([[2.0, 1.0, 0.0]])
    out = sparse_ce(z, jnp.array([[0, 1]]), jnp.array([[0.25, 0.75]]))
    np.testing.assert_allclose(out, [0.25 * 0.40760596 + 0.75 * 1.40760596], rtol=1e-6)
    grad = jax.grad(lambda z: sparse_ce(z, jnp.array([[0]]), jnp.array([[1.0]])).sum())(z)
    np.testing.assert_allclose(grad, [[-0.33475904, 0.24472847, 0.09003057]], rtol=1e-6)


@pytest.mark.parametrize("options", [
    {}, {"label_smoothing": 0.1}, {"class_weights": np.array([1.0, 2.0, 0.5, 3.0])},
    {"z_loss": 0.01}, {"logit_softcap": 2.0}, {"where": np.array([True, True, False, True])},
    {"reduction": "mean", "sample_weights": np.array([1.0, 2.0, 0.5])}, {"base": 10},
], ids=lambda o: "-".join(o) or "plain")
def test_one_entry_of_weight_one_is_the_integer_loss(options):
    labels = jnp.array([0, 3, 1])
    ones = jnp.ones((3, 1))

    def both(z):
        return (sparse_ce(z, labels[:, None], ones, **options),
                jaxce.softmax_cross_entropy_with_integer_labels(z, labels, **options))

    a, b = both(LOGITS)
    ga = jax.grad(lambda z: jnp.sum(both(z)[0]))(LOGITS)
    gb = jax.grad(lambda z: jnp.sum(both(z)[1]))(LOGITS)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-7)


def test_with_class_weights_the_mean_counts_examples_as_soft_labels():
    """The one documented difference from integer labels: "mean" with class weights divides
    by the counted examples' (sample) weights, as the soft-label loss does, not by sum w_y."""
    labels, cw = jnp.array([0, 3, 1]), jnp.array([1.0, 2.0, 0.5, 3.0])
    a = sparse_ce(LOGITS, labels[:, None], jnp.ones((3, 1)), class_weights=cw, reduction="mean")
    b = jaxce.softmax_cross_entropy(LOGITS, jax.nn.one_hot(labels, 4), class_weights=cw,
                                    reduction="mean")
    per = jaxce.softmax_cross_entropy_with_integer_labels(LOGITS, labels, class_weights=cw)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, per.mean(), rtol=1e-6)


def test_duplicates_add_up():
    dup = sparse_ce(LOGITS, jnp.array([[1, 1, 2]] * 3), jnp.array([[0.2, 0.3, 0.5]] * 3))
    merged = sparse_ce(LOGITS, jnp.array([[1, 2]] * 3), jnp.array([[0.5, 0.5]] * 3))
    np.testing.assert_allclose(dup, merged, rtol=1e-6)
    g = jax.grad(lambda z: sparse_ce(z, jnp.array([[1, 1, 2]] * 3),
                                     jnp.array([[0.2, 0.3, 0.5]] * 3)).sum())(LOGITS)
    p = jax.nn.softmax(LOGITS)
    np.testing.assert_allclose(g, p - np.array([[0, 0.5, 0.5, 0]] * 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "int64"])
def test_padding_of_weight_zero_takes_no_part(dtype):
    pad = -1 if np.iinfo(dtype).min < 0 else 200
    indices = np.array([[0, pad, 2], [pad, 3, pad], [1, pad, pad]], dtype)
    weights = jnp.array([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    f = lambda z, a: sparse_ce(z, indices, a).sum()
    value, (gz, ga) = jax.value_and_grad(f, (0, 1))(LOGITS, weights)
    dense = dense_labels(indices.astype(np.int64), weights, 4)
    np.testing.assert_allclose(value, jaxce.softmax_cross_entropy(LOGITS, dense).sum(), rtol=1e-6)
    assert np.isfinite(value) and np.all(np.isfinite(gz)) and np.all(np.isfinite(ga))
    assert np.all(np.asarray(ga)[np.asarray(indices.astype(np.int64)) == pad] == 0.0)
    np.testing.assert_allclose(gz, jax.nn.softmax(LOGITS) - dense, rtol=1e-5, atol=1e-6)


def test_an_index_out_of_range_with_weight_gives_nan_never_a_wrap():
    indices = jnp.array([[0, 4], [1, -1], [2, 3]])
    weights = jnp.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    f = lambda z, a: sparse_ce(z, indices, a)
    out = f(LOGITS, weights)
    assert np.isnan(out[0]) and np.isnan(out[1]) and np.isfinite(out[2])
    gz, ga = jax.grad(lambda z, a: f(z, a).sum(), (0, 1))(LOGITS, weights)
    assert np.all(np.isnan(gz[:2])) and np.all(np.isfinite(gz[2]))
    assert np.all(np.isnan(ga[:2])) and np.all(np.isfinite(ga[2]))
    fused = jaxce.linear_softmax_cross_entropy(jnp.eye(3), LOGITS, indices, label_weights=weights,
                                               reduction="none")
    assert np.isnan(fused[0]) and np.isnan(fused[1]) and np.isfinite(fused[2])


def test_impossible_classes_as_the_dense_loss():
    """A positive weight on a -inf logit is +inf (gradient: 0 on the impossible class, +inf for
    its weight); weight 0 there takes no part; a row of -inf logits without mass is 0."""
    z = LOGITS.copy()
    z[0, 1] = z[1, 3] = -np.inf
    z[2] = -np.inf
    indices = jnp.array([[1, 0], [3, 2], [0, -1]])
    weights = jnp.array([[0.5, 0.5], [0.0, 1.0], [0.0, 0.0]])
    out = sparse_ce(z, indices, weights)
    dense = dense_labels(indices, weights, 4)
    np.testing.assert_array_equal(out, jaxce.softmax_cross_entropy(z, dense))
    assert out[0] == np.inf and np.isfinite(out[1]) and out[2] == 0
    gz, ga = jax.grad(lambda z, a: sparse_ce(z, indices, a).sum(), (0, 1))(jnp.asarray(z), weights)
    gd = jax.grad(lambda z: jaxce.softmax_cross_entropy(z, dense).sum())(jnp.asarray(z))
    np.testing.assert_allclose(gz, gd, rtol=1e-6, atol=1e-7)
    assert gz[0, 1] == 0 and np.all(np.isfinite(gz))
    assert ga[0, 0] == np.inf and np.isfinite(ga[0, 1]) and ga[2, 1] == 0


def test_an_entry_on_a_masked_class_takes_no_part_as_a_masked_soft_label():
    where = jnp.array([True, False, True, True])
    indices, weights = jnp.array([[0, 1]] * 3), jnp.array([[0.5, 0.5]] * 3)
    f = lambda z, a: sparse_ce(z, indices, a, where=where)
    dense = jnp.asarray(dense_labels(indices, weights, 4))
    d = lambda z, y: jaxce.softmax_cross_entropy(z, y, where=where)
    np.testing.assert_allclose(f(LOGITS, weights), d(LOGITS, dense), rtol=1e-6)
    np.testing.assert_allclose(f(LOGITS, weights), d(LOGITS, dense.at[:, 1].set(0.0)), rtol=1e-6)
    gz, ga = jax.grad(lambda z, a: f(z, a).sum(), (0, 1))(LOGITS, weights)
    np.testing.assert_allclose(gz, jax.grad(lambda z: d(z, dense).sum())(LOGITS), rtol=1e-6)
    assert np.all(ga[:, 1] == 0) and np.all(ga[:, 0] > 0)


def test_fully_masked_rows_and_example_masks():
    where = np.ones((3, 4), bool)
    where[1] = False
    indices, weights = jnp.array([[0, 1], [2, 3], [3, -1]]), jnp.array([[0.5, 0.5]] * 3)
    for w in (where, np.array([True, False, True])):  # a full mask, an example mask
        f = lambda z, a, w=w: sparse_ce(z, indices, a, where=w, reduction="mean")
        value, (gz, ga) = jax.value_and_grad(f, (0, 1))(LOGITS, weights)
        rows = np.array([0, 2])
        kept = sparse_ce(LOGITS[rows], indices[rows], weights[rows], reduction="mean")
        np.testing.assert_allclose(value, kept, rtol=1e-6)
        assert np.all(gz[1] == 0) and np.all(ga[1] == 0)


@pytest.mark.parametrize("path", ["inplace", "fused"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_empty_batch_and_no_entries(path, reduction):
    for n, k in ((0, 3), (3, 0)):
        indices, weights = jnp.zeros((n, k), jnp.int32), jnp.zeros((n, k))
        z = jnp.asarray(LOGITS[:n])

        def f(z, a, indices=indices):
            if path == "inplace":
                return sparse_ce(z, indices, a, reduction=reduction)
            return jaxce.linear_softmax_cross_entropy(z, jnp.eye(4), indices, label_weights=a,
                                                      reduction=reduction)

        out = f(z, weights)
        assert out.shape == ((n,) if reduction == "none" else ())
        np.testing.assert_array_equal(out, np.zeros(out.shape))  # no mass: loss 0
        gz, ga = jax.grad(lambda z, a, f=f: jnp.sum(f(z, a)), (0, 1))(z, weights)
        assert gz.shape == z.shape and ga.shape == (n, k)
        assert np.all(np.isfinite(gz))


def test_bfloat16_is_finite_and_keeps_dtypes(rng):
    z = jnp.asarray(30.0 * rng.standard_normal((16, 64)), jnp.bfloat16)
    indices = jnp.asarray(rng.integers(0, 64, (16, 5)))
    weights = jnp.asarray(rng.uniform(size=(16, 5)), jnp.bfloat16)
    f = lambda z, a: sparse_ce(z, indices, a, reduction="mean", z_loss=1e-4)
    value, (gz, ga) = jax.value_and_grad(f, (0, 1))(z, weights)
    assert value.dtype == jnp.float32 and gz.dtype == ga.dtype == jnp.bfloat16
    assert np.isfinite(value) and np.all(np.isfinite(gz)) and np.all(np.isfinite(np.float32(ga)))
    dense = dense_labels(indices, np.float32(weights), 64)
    expected = jaxce.softmax_cross_entropy(z, jnp.asarray(dense, jnp.float32), reduction="mean",
                                           z_loss=1e-4)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_large_logits_lose_no_precision():
    """Logits near 1e4 (and an entry's logit far below the row's maximum, beyond e^88: the
    fallback to the max shift) as the dense loss in float64."""
    z = np.array([[1e4, 1e4 - 1.0, 1e4 - 200.0, 0.0], [5.0, 1e4, 3.0, 1e4 + 0.5]], np.float32)
    indices, weights = np.array([[0, 1], [2, 0]]), np.array([[0.7, 0.3], [0.5, 0.5]], np.float32)
    with jax.enable_x64(True):
        expected = dense_jnp_loss(jnp.asarray(z, jnp.float64), jnp.asarray(indices),
                                  jnp.asarray(weights, jnp.float64))
    np.testing.assert_allclose(sparse_ce(z, indices, weights), expected, rtol=1e-6)


def test_several_class_axes_and_a_batch_of_any_rank(rng):
    z = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # batch (2, 4), classes (5, 3)
    indices = rng.integers(0, 15, (2, 4, 6))
    weights = rng.uniform(size=(2, 4, 6)).astype(np.float32)
    out = sparse_ce(z, indices, weights, axis=(3, 1))
    flat = np.transpose(z, (0, 2, 3, 1)).reshape(2, 4, 15)
    dense = dense_labels(indices.reshape(8, 6), weights.reshape(8, 6), 15).reshape(2, 4, 15)
    np.testing.assert_allclose(out, jaxce.softmax_cross_entropy(flat, dense), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Memory: no [N, K] label array; the backward pass writes only the gradient.


def test_no_dense_temporary():
    n, k_classes, k = 256, 4096, 32
    z = jax.ShapeDtypeStruct((n, k_classes), jnp.float32)
    indices = jax.ShapeDtypeStruct((n, k), jnp.int32)
    weights = jax.ShapeDtypeStruct((n, k), jnp.float32)
    size = n * k_classes * 4
    forward = jax.jit(lambda z, i, a: sparse_ce(z, i, a, reduction="mean"))
    step = jax.jit(jax.value_and_grad(lambda z, i, a: sparse_ce(z, i, a, reduction="mean")))
    for f in (forward, step):
        temp = f.lower(z, indices, weights).compile().memory_analysis().temp_size_in_bytes
        assert temp < size / 4, (f, temp, size)
    jaxpr = str(jax.make_jaxpr(lambda z, i, a: sparse_ce(z, i, a))(z, indices, weights))
    assert "scatter" not in jaxpr  # the forward pass gathers (the backward pass scatters)
    # bfloat16: the entries are scattered into the bfloat16 gradient (as bits), not into a
    # float32 [N, K] gradient rounded afterwards (XLA:CPU copies the bits once: N K 2 bytes)
    z16 = jax.ShapeDtypeStruct((n, k_classes), jnp.bfloat16)
    temp = step.lower(z16, indices, weights).compile().memory_analysis().temp_size_in_bytes
    assert temp < size * 3 / 4, (temp, size)


# ----------------------------------------------------------------------------------------------
# Errors at trace time, naming the shapes and dtypes.


@pytest.mark.parametrize("indices,weights,error,message", [
    (np.zeros((3, 2)), np.ones((3, 2)), TypeError,
     "label_indices must have an integer dtype, got float"),
    (np.zeros((3, 2), int), np.ones((3, 2), int), TypeError,
     "label_weights must have a real floating dtype, got int"),
    (np.zeros((3,), int), np.ones((3,)), ValueError,
     (r"label_indices shape \(3,\) does not match logits shape without axis -1 \(3,\) plus "
      "a last axis of k entries")),
    (np.zeros((2, 2), int), np.ones((2, 2)), ValueError,
     r"label_indices shape \(2, 2\) does not match logits shape without axis -1 \(3,\)"),
    (np.zeros((3, 2), int), np.ones((3, 3)), ValueError,
     r"label_weights shape \(3, 3\) does not match label_indices shape \(3, 2\)"),
])
def test_errors_name_shapes_and_dtypes(indices, weights, error, message):
    with pytest.raises(error, match=message):
        sparse_ce(LOGITS, indices, weights)


def test_fused_errors():
    x, w = jnp.ones((3, 2)), jnp.ones((2, 4))
    with pytest.raises(ValueError, match="ignore_index=-100 does not apply with label_weights"):
        jaxce.linear_softmax_cross_entropy(x, w, jnp.zeros((3, 2), int),
                                           label_weights=jnp.ones((3, 2)), ignore_index=-100)
    with pytest.raises(ValueError, match=r"labels shape \(3,\) does not match x's batch shape"):
        jaxce.linear_softmax_cross_entropy(x, w, jnp.zeros(3, int), label_weights=jnp.ones(3))
    with pytest.raises(ValueError, match=r"label_weights shape \(3, 1\) does not match labels"):
        jaxce.linear_softmax_cross_entropy(x, w, jnp.zeros((3, 2), int),
                                           label_weights=jnp.ones((3, 1)))


# ----------------------------------------------------------------------------------------------
# Checked mode.


def test_checked_reports_an_index_out_of_range_with_weight():
    indices = jnp.array([[0, -1], [1, 2], [3, 9]])
    ok = jnp.array([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])  # padding of weight 0: any index
    checked = jaxce.checked(sparse_ce)
    np.testing.assert_allclose(checked(LOGITS, indices, ok), sparse_ce(LOGITS, indices, ok))
    bad = ok.at[2, 1].set(0.25)
    message = ("jaxce.checked: label_indices[2, 1] = 9 is outside [0, 4) with a non-zero weight "
               "(an entry of weight 0 may hold any index)")
    with pytest.raises(jaxce.CheckError, match="^" + message.replace("[", r"\[").replace(
            "(", r"\(").replace(")", r"\)") + "$"):
        checked(LOGITS, indices, bad)
    with pytest.raises(jaxce.CheckError, match=r"label_weights\[1, 0\] is nan"):
        checked(LOGITS, indices, ok.at[1, 0].set(jnp.nan))
    fused = jaxce.checked(lambda a: jaxce.linear_softmax_cross_entropy(
        jnp.eye(3), LOGITS, indices, label_weights=a))
    with pytest.raises(jaxce.CheckError, match=r"labels\[2, 1\] = 9 is outside \[0, 4\)"):
        fused(bad)


# ----------------------------------------------------------------------------------------------
# Inside shard_map: the fused loss with both axes, against one device (the matrix covers more).


def test_sharded_checked_names_the_global_index():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(MESH), (DATA, MODEL))
    z = jnp.zeros((4, 8))
    indices = jnp.zeros((4, 2), jnp.int32).at[3, 1].set(8)
    weights = jnp.ones((4, 2))
    f = jax.shard_map(
        lambda z, i, a: sparse_ce(z, i, a, reduction="sum", class_axis_name=MODEL,
                                  batch_axis_name=DATA),
        mesh=mesh, in_specs=(P(DATA, MODEL), P(DATA), P(DATA)), out_specs=P(),
    )
    with pytest.raises(jaxce.CheckError, match=r"label_indices\[3, 1\] = 8 is outside \[0, 8\)"):
        jaxce.checked(f)(z, indices, weights)
