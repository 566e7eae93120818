"""jaxce.linear_softmax_divergence: the fused divergence equals softmax_divergence(x @ w + b, ...).

In float64 (enable_x64) the fused value and its gradients in x, w and bias must equal the
in-place divergence of the materialised logits (itself checked against float64 NumPy and
autodiff in tests/test_divergence.py) for every kind, temperature, teacher form (logits, a
head, a head with bias), mask, -inf bias, reduction, block size (dividing N or not) and the
column-tiled backward forced onto small problems; float32 and bfloat16 agree to their
precision; sharded on simulated devices equals one device; temp memory is flat in V.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxce
from jaxce import _sweeps, _tiles

KINDS = ["forward_kl", "reverse_kl", "jsd"]
N, D, DT, V = 13, 6, 4, 21


def problem(seed=0, v=V, n=N):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    w = rng.standard_normal((D, v))
    b = rng.standard_normal(v)
    b[3] = -np.inf  # a class impossible for the student
    tx = rng.standard_normal((n, DT))
    tw = 2.0 * rng.standard_normal((DT, v))
    tb = rng.standard_normal(v)
    tb[3] = -np.inf  # ... and for the teacher: it takes no part
    return x, w, b, tx, tw, tb


def teacher_forms(tx, tw, tb):
    return {"logits": tx @ tw + tb, "head": (tx, tw, tb)}


def in_place(x, w, b, teacher_logits, **options):
    return jaxce.softmax_divergence(x @ w + b, teacher_logits, **options)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "none", "sum", "segment_mean"])
@pytest.mark.parametrize("teacher_form", ["logits", "head"])
@pytest.mark.parametrize("block_size", [4, 13, None])
def test_fused_equals_in_place_in_float64(kind, reduction, teacher_form, block_size):
    with jax.enable_x64(True):
        x, w, b, tx, tw, tb = problem()
        teacher = teacher_forms(tx, tw, tb)[teacher_form]
        where = np.ones(V, bool)
        where[7] = False
        sw = np.linspace(0.5, 2.0, N)
        options = {"kind": kind, "temperature": 1.7, "beta": 0.3, "where": where, "sample_weights": sw,
                       "reduction": reduction, "segment_ids": np.arange(N) // 4, "num_segments": 4}
        cot = np.linspace(-1.0, 1.0, N) if reduction == "none" else 1.0
        fused = lambda x, w, b: jnp.sum(cot * jaxce.linear_softmax_divergence(
            x, w, teacher, bias=b, block_size=block_size, **options))
        plain = lambda x, w, b: jnp.sum(cot * in_place(x, w, b, tx @ tw + tb, **options))
        np.testing.assert_allclose(fused(x, w, b), plain(x, w, b), rtol=1e-12)
        for got, want in zip(jax.grad(fused, (0, 1, 2))(x, w, b), jax.grad(plain, (0, 1, 2))(x, w, b)):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("v", [8, 21, 5])  # one tile, 2 + a ragged 5, narrower than one tile
def test_column_tiles_match_in_place(monkeypatch, kind, v):
    monkeypatch.setattr(_tiles, "TILE_BYTES", 1)
    monkeypatch.setattr(_tiles, "MIN_TILE_COLUMNS", 8)
    with jax.enable_x64(True):
        x, w, b, tx, tw, _tb = problem(1, v=v)
        fused = lambda x, w, b: jaxce.linear_softmax_divergence(
            x, w, (tx, tw), bias=b, kind=kind, block_size=4)
        plain = lambda x, w, b: in_place(x, w, b, tx @ tw, kind=kind, reduction="mean")
        np.testing.assert_allclose(fused(x, w, b), plain(x, w, b), rtol=1e-12)
        for got, want in zip(jax.grad(fused, (0, 1, 2))(x, w, b), jax.grad(plain, (0, 1, 2))(x, w, b)):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_precision_agrees_with_float64(dtype):
    x, w, b, tx, tw, _tb = problem(2)
    b = np.where(np.isinf(b), 0.0, b)
    teacher = (tx @ tw).astype(np.float32)
    with jax.enable_x64(True):
        want = in_place(x, w, b, teacher.astype(np.float64), kind="jsd", reduction="none")
        gw = jax.grad(lambda w: jnp.sum(in_place(x, w, b, teacher, kind="jsd")))(w)
    cast = lambda a: jnp.asarray(a, dtype)
    got = jaxce.linear_softmax_divergence(
        cast(x), cast(w), cast(teacher), bias=cast(b), kind="jsd", reduction="none")
    assert got.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    dw = jax.grad(lambda w: jnp.sum(jaxce.linear_softmax_divergence(
        cast(x), w, cast(teacher), bias=cast(b), kind="jsd", reduction="none")))(cast(w))
    assert dw.dtype == dtype
    np.testing.assert_allclose(np.asarray(dw, np.float64), gw, atol=tol * np.abs(gw).max())


def test_teacher_gets_no_gradient_and_forward_kl_gradient_is_p_s_minus_p_t():
    x, w, _b, tx, tw, _tb = (np.asarray(a, np.float32) for a in problem(3))
    np.zeros(V, np.float32)
    teacher = tx @ tw
    g_teacher = jax.grad(lambda t: jaxce.linear_softmax_divergence(x, w, t))(teacher)
    assert np.all(g_teacher == 0.0)
    dz = jax.grad(lambda z: jaxce.softmax_divergence(z, teacher, reduction="sum"))(x @ w)
    want = jax.nn.softmax(x @ w) - jax.nn.softmax(teacher)
    np.testing.assert_allclose(dz, want, atol=1e-6)
    dw = jax.grad(lambda w: jaxce.linear_softmax_divergence(x, w, teacher, reduction="sum"))(w)
    np.testing.assert_allclose(dw, x.T @ want, atol=1e-5)


def test_temp_memory_is_flat_in_v_and_far_below_the_logits():
    n, d = 512, 64

    def temp(v):
        x = jax.ShapeDtypeStruct((n, d), jnp.float32)
        w = jax.ShapeDtypeStruct((d, v), jnp.float32)
        t = jax.ShapeDtypeStruct((n, v), jnp.float32)
        f = jax.jit(jax.grad(lambda x, w, t: jaxce.linear_softmax_divergence(x, w, t), (0, 1)))
        return f.lower(x, w, t).compile().memory_analysis().temp_size_in_bytes

    small, large = temp(16384), temp(65536)
    assert large <= 1.25 * small, (small, large)
    # about BLOCK_BYTES of blocks (32 MiB), where one [N, V] float32 array is 128 MiB
    assert large <= 1.25 * _sweeps.BLOCK_BYTES < n * 65536 * 4, large


@functools.cache
def sharded_case():
    x, w, _b, tx, tw, _tb = (np.asarray(a, np.float32) for a in problem(4, v=16, n=8))
    return x, w, np.zeros(16, np.float32), tx, tw


@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits_with_a_temperature_below_one(kind):
    """Logits near float32's largest number at tau = 0.5 (z / tau would overflow): the exact
    values of softmaxes [1/2, 1/2, 0, 0] and [1/3, 1/3, 1/3, 0], and the in-place gradient."""
    huge, tau = 3e38, 0.5
    narrow, wide = [huge, huge, 0.0, -huge], [huge, huge, huge, -huge]
    p_narrow, p_wide = np.array([0.5, 0.5, 0.0, 0.0]), np.array([1.0, 1.0, 1.0, 0.0]) / 3
    # the side that enters as -log (the student for the forward KL) covers the other's support
    forward = kind == "forward_kl"
    x, teacher = (wide, narrow) if forward else (narrow, wide)
    p_s, p_t = (p_wide, p_narrow) if forward else (p_narrow, p_wide)
    x, teacher = np.array([x], np.float32), np.array([teacher], np.float32)
    w = np.eye(4, dtype=np.float32)
    m = 0.5 * (p_s + p_t)
    want = {
        "forward_kl": scipy.special.rel_entr(p_t, p_s).sum(),
        "reverse_kl": scipy.special.rel_entr(p_s, p_t).sum(),
        "jsd": 0.5 * (scipy.special.rel_entr(p_t, m).sum() + scipy.special.rel_entr(p_s, m).sum()),
    }[kind]
    fused = lambda x: jaxce.linear_softmax_divergence(x, w, teacher, kind=kind, temperature=tau)
    value, dx = jax.value_and_grad(fused)(x)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    in_place = lambda z: jaxce.softmax_divergence(z, teacher, kind=kind, temperature=tau).sum()
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx, jax.grad(in_place)(x), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_form", ["logits", "head"])
def test_sharded_equals_one_device(kind, teacher_form):
    x, w, b, tx, tw = sharded_case()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    options = {"kind": kind, "temperature": 1.3, "block_size": 2}
    teacher = tx @ tw if teacher_form == "logits" else (tx, tw)
    teacher_spec = P("data", "model") if teacher_form == "logits" else (P("data"), P(None, "model"))

    def local(x, w, b, teacher):
        return jaxce.linear_softmax_divergence(
            x, w, teacher, bias=b, class_axis_name="model", batch_axis_name="data", **options)

    sharded = jax.shard_map(local, mesh=mesh, out_specs=P(),
                            in_specs=(P("data"), P(None, "model"), P("model"), teacher_spec))
    one = lambda x, w, b: jaxce.linear_softmax_divergence(x, w, teacher, bias=b, **options)
    two = lambda x, w, b: sharded(x, w, b, teacher)
    np.testing.assert_allclose(two(x, w, b), one(x, w, b), rtol=1e-6)
    for got, want in zip(jax.jit(jax.grad(two, (0, 1, 2)))(x, w, b), jax.grad(one, (0, 1, 2))(x, w, b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        (np.zeros((N, V + 1)), r"teacher shape \(13, 22\)"),
        ((np.zeros((N, DT)), np.zeros((DT + 1, V))), r"teacher_w shape \(5, 21\)"),
        ((np.zeros((N + 1, DT)), np.zeros((DT, V))), r"teacher_x shape \(14, 4\)"),
        ((np.zeros((N, DT)),), "a sequence of 1"),
    ],
)
def test_bad_teachers_raise(teacher, message):
    x, w, *_ = problem()
    with pytest.raises(ValueError, match=message):
        jaxce.linear_softmax_divergence(x, w, teacher)
