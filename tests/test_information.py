"""Tests for the information measures: REFERENCE.md section 2 numbers in nats, bits and
hartleys, SciPy float64 references, 0 log 0 = 0 in value and gradient, and the logit forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st
from jax.test_util import check_grads

import jaxce

BASES = [None, 2, 10, 3.5]
F32 = dict(rtol=2e-6, atol=1e-6)


def ln(base):
    return 1.0 if base is None else math.log(base)


def dirichlet(rng, shape):
    x = rng.gamma(1.0, size=shape)
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# REFERENCE.md section 2: seed 000's numbers are in base 10


P_NOTE = np.array([0.7, 0.2, 0.1], np.float32)


@pytest.mark.parametrize(
    "base,expected",
    [
        (10, [0.15490196, 0.69897000, 1.0]),
        (None, [0.35667494, 1.60943791, 2.30258509]),
        (math.e, [0.35667494, 1.60943791, 2.30258509]),
        (2, [0.51457317, 2.32192809, 3.32192809]),
    ],
)
def test_reference_information(base, expected):
    out = jaxce.information(P_NOTE, base=base)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # Rare events carry more information.
    assert np.all(np.diff(np.asarray(out)) > 0)
    assert float(jaxce.information(jnp.array(0.0), base=base)) == np.inf


@pytest.mark.parametrize(
    "base,expected", [(10, 0.34822537), (None, 0.80181855), (2, 1.15677965)]
)
def test_reference_entropy(base, expected):
    np.testing.assert_allclose(jaxce.entropy(P_NOTE, base=base), expected, rtol=1e-6)
    # H = E_P[I]
    np.testing.assert_allclose(
        jnp.sum(P_NOTE * jaxce.information(P_NOTE, base=base)), expected, rtol=1e-6
    )


@pytest.mark.parametrize(
    "p,q,base,expected",
    [
        ([1.0, 0.0, 0.0], [0.7, 0.2, 0.1], 10, 0.15490196),
        ([0.0, 1.0, 0.0], [0.7, 0.2, 0.1], 10, 0.69897000),
        ([1.0, 0.0, 0.0], [0.66524096, 0.24472847, 0.09003057], None, 0.40760596),
        ([1.0, 0.0, 0.0], [0.66524096, 0.24472847, 0.09003057], 10, 0.17702102),
        ([0.0, 1.0, 0.0], [0.66524096, 0.24472847, 0.09003057], None, 1.40760596),
    ],
)
def test_reference_cross_entropy(p, q, base, expected):
    p, q = jnp.array(p), jnp.array(q)
    np.testing.assert_allclose(jaxce.cross_entropy(p, q, base=base), expected, rtol=1e-6)
    # For a one-hot P, H(P) = 0 and H(P, Q) = KL(P || Q).
    np.testing.assert_allclose(jaxce.kl_divergence(p, q, base=base), expected, rtol=1e-6)


def test_reference_cross_entropy_from_logits():
    # The same numbers straight from the logits [2, 1, 0] (the softmax forms).
    z = jnp.array([2.0, 1.0, 0.0])
    onehot = jnp.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(
        jaxce.softmax_kl_divergence(jnp.array([0.0, -jnp.inf, -jnp.inf]), z), 0.40760596, rtol=1e-6
    )
    np.testing.assert_allclose(
        jaxce.cross_entropy(onehot, jaxce.softmax(z), base=10), 0.17702102, rtol=1e-6
    )


def test_kl_zero_on_equal_and_not_symmetric():
    p, q = jnp.array([0.5, 0.5]), jnp.array([0.9, 0.1])
    assert float(jaxce.kl_divergence(P_NOTE, P_NOTE)) == pytest.approx(0.0, abs=1e-7)
    pq, qp = float(jaxce.kl_divergence(p, q)), float(jaxce.kl_divergence(q, p))
    np.testing.assert_allclose(pq, st.entropy([0.5, 0.5], [0.9, 0.1]), rtol=1e-6)
    np.testing.assert_allclose(qp, st.entropy([0.9, 0.1], [0.5, 0.5]), rtol=1e-6)
    assert abs(pq - qp) > 0.1


# ------------------------------------------------------------------------------------------
# Against SciPy on random distributions, every base, int and tuple axes


@pytest.mark.parametrize("base", BASES)
def test_vs_scipy_last_axis(rng, base):
    p, q = dirichlet(rng, (4, 5)), dirichlet(rng, (4, 5))
    p64, q64 = p.astype(np.float64), q.astype(np.float64)
    np.testing.assert_allclose(jaxce.entropy(p, base=base), st.entropy(p64, base=base, axis=-1), **F32)
    kl = st.entropy(p64, q64, base=base, axis=-1)
    np.testing.assert_allclose(jaxce.kl_divergence(p, q, base=base), kl, **F32)
    np.testing.assert_allclose(
        jaxce.kl_divergence(p, q, base=base), sp.rel_entr(p64, q64).sum(-1) / ln(base), **F32
    )
    ce = st.entropy(p64, base=base, axis=-1) + kl
    np.testing.assert_allclose(jaxce.cross_entropy(p, q, base=base), ce, **F32)
    np.testing.assert_allclose(
        jaxce.information(p, base=base), -np.log(p64) / ln(base), rtol=1e-6
    )


def test_vs_scipy_axis_0_and_tuple_axis(rng):
    p, q = dirichlet(rng, (3, 4, 2)), dirichlet(rng, (3, 4, 2))
    # axis 0: normalise along axis 0
    p0 = p / p.sum(0, keepdims=True)
    q0 = q / q.sum(0, keepdims=True)
    p064, q064 = p0.astype(np.float64), q0.astype(np.float64)
    np.testing.assert_allclose(jaxce.entropy(p0, 0), st.entropy(p064, axis=0), **F32)
    np.testing.assert_allclose(
        jaxce.kl_divergence(p0, q0, 0, base=2), st.entropy(p064, q064, base=2, axis=0), **F32
    )
    # tuple axis (1, 2): one distribution over 8 outcomes per row
    pt = (p / p.sum((1, 2), keepdims=True)).astype(np.float32)
    qt = (q / q.sum((1, 2), keepdims=True)).astype(np.float32)
    pf, qf = pt.reshape(3, 8).astype(np.float64), qt.reshape(3, 8).astype(np.float64)
    np.testing.assert_allclose(jaxce.entropy(pt, (1, 2), base=10), st.entropy(pf, base=10, axis=1), **F32)
    np.testing.assert_allclose(jaxce.kl_divergence(pt, qt, (1, 2)), st.entropy(pf, qf, axis=1), **F32)
    np.testing.assert_allclose(
        jaxce.cross_entropy(pt, qt, (-1, -2)), -(pf * np.log(qf)).sum(1), **F32
    )


def test_broadcasting_q_against_batch(rng):
    p = dirichlet(rng, (4, 3))
    q = np.array([0.7, 0.2, 0.1], np.float32)
    ref = -(p.astype(np.float64) * np.log(q.astype(np.float64))).sum(-1)
    out = jaxce.cross_entropy(p, q)
    assert out.shape == (4,)
    np.testing.assert_allclose(out, ref, **F32)


def test_where_mask(rng):
    p, q = dirichlet(rng, (3, 4)), dirichlet(rng, (3, 4))
    m = np.array([[True, True, False, True], [False] * 4, [True, False, True, True]])
    p64, q64 = p.astype(np.float64), q.astype(np.float64)
    np.testing.assert_allclose(
        jaxce.entropy(p, where=m), -np.where(m, p64 * np.log(p64), 0).sum(-1), **F32
    )
    np.testing.assert_allclose(
        jaxce.cross_entropy(p, q, where=m, base=2),
        -np.where(m, p64 * np.log2(q64), 0).sum(-1),
        **F32,
    )
    np.testing.assert_allclose(
        jaxce.kl_divergence(p, q, where=m), np.where(m, sp.rel_entr(p64, q64), 0).sum(-1), **F32
    )
    # A masked q = 0 (would be +inf) takes no part.
    qz = q.copy()
    qz[0, 2] = 0.0
    assert np.isfinite(float(jaxce.cross_entropy(p, qz, where=m)[0]))
    assert float(jaxce.cross_entropy(p, qz)[0]) == np.inf


def test_jit_and_vmap(rng):
    p, q = dirichlet(rng, (4, 3)), dirichlet(rng, (4, 3))
    ref = st.entropy(p.astype(np.float64), q.astype(np.float64), axis=-1, base=2)
    f = jax.jit(lambda p, q: jaxce.kl_divergence(p, q, base=2))
    np.testing.assert_allclose(f(p, q), ref, **F32)
    np.testing.assert_allclose(jax.vmap(lambda a, b: jaxce.kl_divergence(a, b, base=2))(p, q), ref, **F32)


# ------------------------------------------------------------------------------------------
# 0 log 0 = 0, in value and gradient; p > 0 with q = 0 is +inf


P0 = np.array([0.5, 0.0, 0.3, 0.2, 0.0], np.float32)
Q0 = np.array([0.25, 0.0, 0.25, 0.25, 0.25], np.float32)


@pytest.mark.parametrize("base", [None, 2, 10])
def test_zero_log_zero_values(base):
    p64, q64 = P0.astype(np.float64), Q0.astype(np.float64)
    np.testing.assert_allclose(jaxce.entropy(P0, base=base), st.entropy(p64, base=base), **F32)
    np.testing.assert_allclose(
        jaxce.kl_divergence(P0, Q0, base=base), st.entropy(p64, q64, base=base), **F32
    )
    nz = p64 > 0
    ce = -(p64[nz] * np.log(q64[nz])).sum() / ln(base)
    np.testing.assert_allclose(jaxce.cross_entropy(P0, Q0, base=base), ce, **F32)
    assert float(jaxce.entropy(jnp.array([1.0, 0.0, 0.0]), base=base)) == 0.0


@pytest.mark.parametrize("base", [None, 2, 10])
def test_zero_log_zero_gradients(base):
    p64, q64 = P0.astype(np.float64), Q0.astype(np.float64)
    nz = p64 > 0
    s = ln(base)
    # entropy: dH/dp = -(log p + 1) where p > 0; 0 where p = 0 (the term is constant 0).
    g = np.asarray(jax.grad(lambda p: jaxce.entropy(p, base=base))(P0), np.float64)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[~nz], 0.0)
    np.testing.assert_allclose(g[nz], -(np.log(p64[nz]) + 1) / s, rtol=1e-5)
    # cross-entropy, linear in p: d/dp = -log q, also where p = 0 (P0[4] = 0, Q0[4] = 0.25),
    # and 0 where q = 0 too (the term is constant 0 there); d/dq = -p / q (0 where p = 0).
    gp, gq = jax.grad(lambda p, q: jaxce.cross_entropy(p, q, base=base), (0, 1))(P0, Q0)
    gp, gq = np.asarray(gp, np.float64), np.asarray(gq, np.float64)
    assert np.isfinite(gp).all() and np.isfinite(gq).all()
    possible = q64 > 0
    np.testing.assert_array_equal(gp[~possible], 0.0)
    np.testing.assert_allclose(gp[possible], -np.log(q64[possible]) / s, rtol=1e-5)
    assert gp[4] != 0.0
    np.testing.assert_allclose(gq, np.where(nz, -p64 / np.where(nz, q64, 1) / s, 0.0), rtol=1e-5)
    # KL: d/dp = log p - log q + 1, d/dq = -p / q.
    gp, gq = jax.grad(lambda p, q: jaxce.kl_divergence(p, q, base=base), (0, 1))(P0, Q0)
    gp, gq = np.asarray(gp, np.float64), np.asarray(gq, np.float64)
    assert np.isfinite(gp).all() and np.isfinite(gq).all()
    np.testing.assert_array_equal(gp[~nz], 0.0)
    np.testing.assert_allclose(gp[nz], (np.log(p64[nz]) - np.log(q64[nz]) + 1) / s, rtol=1e-5)
    np.testing.assert_allclose(gq, np.where(nz, -p64 / np.where(nz, q64, 1) / s, 0.0), rtol=1e-5)


def test_p_positive_where_q_zero_is_inf():
    p = jnp.array([0.5, 0.5, 0.0])
    q = jnp.array([1.0, 0.0, 0.0])
    for base in (None, 2, 10):
        assert float(jaxce.cross_entropy(p, q, base=base)) == np.inf
        assert float(jaxce.kl_divergence(p, q, base=base)) == np.inf
    np.testing.assert_array_equal(jaxce.information(q), [0.0, np.inf, np.inf])
    assert st.entropy([0.5, 0.5, 0.0], [1.0, 0.0, 0.0]) == np.inf  # SciPy agrees


def test_check_grads_plain_measures(rng):
    with jax.enable_x64(True):
        # Entries well above 0, where finite differences of log p are accurate.
        p = jnp.asarray(sp.softmax(rng.normal(size=(2, 4)) * 0.3, -1), jnp.float64)
        q = jnp.asarray(sp.softmax(rng.normal(size=(2, 4)) * 0.3, -1), jnp.float64)
        z = jnp.asarray(rng.normal(size=(2, 4)), jnp.float64)
        both = ["fwd", "rev"]
        check_grads(jax.jit(lambda p: jaxce.entropy(p, base=2)), (p,), order=1, modes=both)
        check_grads(jax.jit(jaxce.cross_entropy), (p, q), order=1, modes=both)
        check_grads(jax.jit(jaxce.kl_divergence), (p, q), order=1, modes=both)
        check_grads(jax.jit(lambda z: jaxce.softmax_entropy(z, base=10)), (z,), order=1, modes=both)
        check_grads(jax.jit(jaxce.softmax_kl_divergence), (z, z[::-1]), order=1, modes=both)


# ------------------------------------------------------------------------------------------
# softmax_entropy and softmax_kl_divergence: from logits, -inf allowed


def np_entropy_grad(z):
    """Analytic float64 dH(softmax z)/dz = -p (log p + H), 0 where p = 0."""
    z = np.asarray(z, np.float64)
    p = sp.softmax(z, -1)
    logp = np.where(p > 0, sp.log_softmax(z, -1), 0.0)
    h = -(p * logp).sum(-1, keepdims=True)
    return -p * (logp + h), h[..., 0]


def numeric_grad(f, z, eps=1e-6):
    """Central finite differences of a float64 NumPy function over the finite entries of z."""
    z = np.asarray(z, np.float64)
    g = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        if not np.isfinite(z[i]):
            continue
        e = np.zeros_like(z)
        e[i] = eps
        g[i] = (f(z + e) - f(z - e)) / (2 * eps)
    return g


def np_softmax_entropy(z):
    p = sp.softmax(z, -1)
    return -(sp.xlogy(p, p)).sum()


LOGITS = [
    [2.0, 1.0, 0.0],
    [0.0, 0.0, -np.inf],
    [-np.inf, 3.0, -1.0, -np.inf],
    [1e4, 1e4 - 1.0, -1e4],
]


@pytest.mark.parametrize("z", LOGITS)
@pytest.mark.parametrize("base", [None, 2])
def test_softmax_entropy_value_and_gradient(z, base):
    zf = jnp.array(z, jnp.float32)
    z64 = np.asarray(zf, np.float64)
    ref_g, ref_h = np_entropy_grad(z64)
    h = jaxce.softmax_entropy(zf, base=base)
    np.testing.assert_allclose(float(h), ref_h / ln(base), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(h), st.entropy(sp.softmax(z64), base=base), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda z: jaxce.softmax_entropy(z, base=base))(zf)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, ref_g / ln(base), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g)[~np.isfinite(z64)], 0.0)
    if abs(z64).max() < 100:  # the analytic reference itself against finite differences
        np.testing.assert_allclose(numeric_grad(np_softmax_entropy, z64), ref_g, atol=1e-8)


def test_softmax_entropy_examples():
    np.testing.assert_allclose(jaxce.softmax_entropy(jnp.array([0.0, 0.0, -jnp.inf]), base=2), 1.0)
    np.testing.assert_allclose(jaxce.softmax_entropy(jnp.zeros(4), base=2), 2.0, rtol=1e-6)
    assert float(jaxce.softmax_entropy(jnp.array([0.0, -jnp.inf]))) == 0.0
    np.testing.assert_allclose(
        jaxce.softmax_entropy(jnp.array([2.0, 1.0, 0.0]), base=10),
        st.entropy([0.66524096, 0.24472847, 0.09003057], base=10),
        rtol=1e-6,
    )


def test_softmax_entropy_where_and_tuple_axis(rng):
    z = rng.normal(size=(2, 3, 4)).astype(np.float32)
    m = rng.random((2, 3, 4)) > 0.3
    zm = np.where(m, z.astype(np.float64), -np.inf)
    ref = np.array([np_softmax_entropy(r) for r in zm.reshape(2, 12)])
    np.testing.assert_allclose(jaxce.softmax_entropy(z, (1, 2), where=m), ref, **F32)
    zrows = zm.reshape(6, 4)
    ref = np.array([np_softmax_entropy(r) for r in zrows]).reshape(2, 3)
    np.testing.assert_allclose(jaxce.softmax_entropy(z, where=m), ref, **F32)


def np_kl_from_logits(zp, zq):
    p = sp.softmax(zp, -1)
    with np.errstate(invalid="ignore"):
        cross = np.where(p > 0, p * np.where(p > 0, sp.log_softmax(zq, -1), 0.0), 0.0)
    return (sp.xlogy(p, p) - cross).sum(-1)


KL_LOGITS = [
    ([2.0, 1.0, 0.0], [0.0, 1.0, 2.0]),
    ([0.0, -np.inf, 1.0], [0.5, 0.5, -1.0]),  # p has an impossible class, q does not
    ([0.0, -np.inf, 1.0], [0.5, -np.inf, -1.0]),  # both impossible on the same class
    ([1e4, 0.0, -1e4], [1e4 - 2.0, 1e4, 0.0]),
]


@pytest.mark.parametrize("zp,zq", KL_LOGITS)
@pytest.mark.parametrize("base", [None, 10])
def test_softmax_kl_value_and_gradient(zp, zq, base):
    zpf, zqf = jnp.array(zp, jnp.float32), jnp.array(zq, jnp.float32)
    zp64, zq64 = np.asarray(zpf, np.float64), np.asarray(zqf, np.float64)
    p, q = sp.softmax(zp64), sp.softmax(zq64)
    kl = np_kl_from_logits(zp64, zq64)
    s = ln(base)
    out = jaxce.softmax_kl_divergence(zpf, zqf, base=base)
    np.testing.assert_allclose(float(out), kl / s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out), st.entropy(p, q, base=base), rtol=1e-5, atol=1e-6)
    gp, gq = jax.grad(lambda a, b: jaxce.softmax_kl_divergence(a, b, base=base), (0, 1))(zpf, zqf)
    assert np.isfinite(np.asarray(gp)).all() and np.isfinite(np.asarray(gq)).all()
    logp = np.where(p > 0, sp.log_softmax(zp64), 0.0)
    logq = np.where(p > 0, sp.log_softmax(zq64), 0.0)
    # dKL/dzp = p (log p - log q - KL); dKL/dzq = q - p
    np.testing.assert_allclose(gp, p * (logp - logq - kl) / s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gq, (q - p) / s, rtol=1e-5, atol=1e-6)
    if np.isfinite(zp64).all() and abs(zp64).max() < 100:
        ref = numeric_grad(lambda a: np_kl_from_logits(a, zq64), zp64)
        np.testing.assert_allclose(ref, p * (logp - logq - kl), atol=1e-8)


def test_softmax_kl_inf_where_q_impossible():
    out = jaxce.softmax_kl_divergence(jnp.array([0.0, 1.0]), jnp.array([0.0, -jnp.inf]))
    assert float(out) == np.inf


def test_softmax_kl_self_is_zero_and_where(rng):
    z = rng.normal(size=(3, 5)).astype(np.float32)
    np.testing.assert_allclose(jaxce.softmax_kl_divergence(z, z), 0.0, atol=1e-6)
    zq = rng.normal(size=(3, 5)).astype(np.float32)
    m = np.array([True, True, False, True, False])
    ref = np_kl_from_logits(np.where(m, z, -np.inf).astype(np.float64), np.where(m, zq, -np.inf).astype(np.float64))
    np.testing.assert_allclose(jaxce.softmax_kl_divergence(z, zq, where=m), ref, **F32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_finite(rng, dtype):
    p = jnp.asarray(dirichlet(rng, (3, 4)), dtype)
    z = jnp.asarray(rng.normal(size=(3, 4)), dtype)
    p64 = np.asarray(p.astype(jnp.float32), np.float64)  # the rounded inputs, exactly
    h = jaxce.entropy(p)
    assert np.isfinite(np.asarray(h, np.float32)).all()
    np.testing.assert_allclose(np.asarray(h, np.float64), -sp.xlogy(p64, p64).sum(-1), rtol=1e-5)
    hz = jaxce.softmax_entropy(z)
    z64 = np.asarray(z.astype(jnp.float32), np.float64)
    ref = np.array([np_softmax_entropy(r) for r in z64])
    np.testing.assert_allclose(np.asarray(hz, np.float64), ref, rtol=1e-5)
    g = jax.grad(lambda z: jaxce.softmax_entropy(z).sum())(z)
    assert g.dtype == dtype and np.isfinite(np.asarray(g, np.float32)).all()


# ------------------------------------------------------------------------------------------
# Bad input

BAD = [
    (lambda: jaxce.entropy(jnp.array([1, 0])), TypeError, r"p must have a real floating dtype, got int32"),
    (lambda: jaxce.information(jnp.array([1, 0])), TypeError, r"p must have a real floating dtype"),
    (lambda: jaxce.cross_entropy(jnp.ones(3), jnp.array([1j, 1j, 1j])), TypeError, r"q must have a real floating dtype, got complex"),
    (
        lambda: jaxce.kl_divergence(jnp.ones((2, 3)), jnp.ones((2, 4))),
        ValueError,
        r"shapes do not broadcast: p \(2, 3\), q \(2, 4\)",
    ),
    (lambda: jaxce.entropy(jnp.ones(3), axis=1), ValueError, r"axis 1 is out of range"),
    (lambda: jaxce.entropy(jnp.ones(3), base=1), ValueError, r"base must be finite, > 0 and != 1, got 1"),
    (lambda: jaxce.entropy(jnp.ones(3), base=1.0), ValueError, r"!= 1, got 1.0"),
    (lambda: jaxce.cross_entropy(jnp.ones(3), jnp.ones(3), base=0), ValueError, r"> 0 and != 1, got 0"),
    (lambda: jaxce.kl_divergence(jnp.ones(3), jnp.ones(3), base=-2), ValueError, r"got -2"),
    (lambda: jaxce.information(jnp.ones(3), base=math.inf), ValueError, r"base must be finite"),
    (lambda: jaxce.information(jnp.ones(3), base="2"), TypeError, r"base must be a Python number or None, got '2'"),
    (lambda: jaxce.softmax_entropy(jnp.arange(3)), TypeError, r"logits must have a real floating dtype"),
    (lambda: jaxce.softmax_entropy(jnp.ones(3), base=1), ValueError, r"!= 1, got 1"),
    (
        lambda: jaxce.softmax_kl_divergence(jnp.ones(3), jnp.ones(4)),
        ValueError,
        r"shapes do not broadcast: p_logits \(3,\), q_logits \(4,\)",
    ),
    (
        lambda: jaxce.entropy(jnp.ones((2, 3)), where=jnp.ones(4, bool)),
        ValueError,
        r"where shape \(4,\) is not broadcastable",
    ),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("z", [[1e4, 1e4 - 1.0, -1e4], [3e38, -3e38, 0.0], [-1e4, -1e4, 3.0]])
def test_softmax_measures_finite_for_huge_logits(z):
    zf = jnp.array(z, jnp.float32)
    for f in (
        lambda z: jaxce.softmax_entropy(z),
        lambda z: jaxce.softmax_kl_divergence(z, z[::-1]),
        lambda z: jaxce.softmax_kl_divergence(z[::-1] * 0.5, z),
    ):
        v, g = jax.value_and_grad(f)(zf)
        assert np.isfinite(float(v)) and np.isfinite(np.asarray(g)).all()


# ------------------------------------------------------------------------------------------
# Masked entries holding NaN, inf or a negative number take no part, in value or gradient

MASK_24 = np.array([[True, True, False, True], [False, True, True, True]])


def masked_distribution(rng, mask):
    """float64 probabilities over the unmasked entries of each row, 0 on the masked ones."""
    x = rng.gamma(1.0, size=mask.shape) * mask
    return x / x.sum(-1, keepdims=True)


def masked_log_softmax(z, mask):
    """float64 log-softmax over the unmasked entries of each row, 0 on the masked ones."""
    lse = sp.logsumexp(np.where(mask, z, -np.inf), axis=-1, keepdims=True)
    return np.where(mask, z - lse, 0.0)


@pytest.mark.parametrize("junk", [np.nan, np.inf, -np.inf, -1.0])
@pytest.mark.parametrize("base", [None, 2])
def test_masked_junk_reaches_no_value_or_gradient(rng, junk, base):
    m = MASK_24
    p, q = masked_distribution(rng, m), masked_distribution(rng, m)
    zp, zq = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    lp, lq = masked_log_softmax(zp, m), masked_log_softmax(zq, m)
    sp_, sq = np.where(m, np.exp(lp), 0.0), np.where(m, np.exp(lq), 0.0)
    log_p, log_q = np.log(np.where(m, p, 1.0)), np.log(np.where(m, q, 1.0))
    h = -np.sum(p * log_p, -1)
    kl = np.sum(p * (log_p - log_q), -1)
    sh = -np.sum(sp_ * lp, -1)
    skl = np.sum(sp_ * (lp - lq), -1)
    cases = [  # (function, float64 inputs, value in nats, gradients in nats; 0 where masked)
        (jaxce.entropy, (p,), h, (-(log_p + 1),)),
        (jaxce.cross_entropy, (p, q), h + kl, (-log_q, -p / np.where(m, q, 1.0))),
        (jaxce.kl_divergence, (p, q), kl, (log_p - log_q + 1, -p / np.where(m, q, 1.0))),
        (jaxce.softmax_entropy, (zp,), sh, (-sp_ * (lp + sh[:, None]),)),
        (jaxce.softmax_kl_divergence, (zp, zq), skl, (sp_ * (lp - lq - skl[:, None]), sq - sp_)),
    ]
    for f, args, value, grads in cases:
        args = [np.where(m, a, junk).astype(np.float32) for a in args]
        g = jax.grad(lambda *a: jnp.sum(f(*a, base=base, where=m)), range(len(args)))
        np.testing.assert_allclose(f(*args, base=base, where=m), value / ln(base), **F32)
        for got, want in zip(g(*args), grads):
            np.testing.assert_array_equal(np.asarray(got)[~m], 0.0)
            np.testing.assert_allclose(got, np.where(m, want, 0.0) / ln(base), rtol=1e-5, atol=1e-6)
    # A batch-shaped mask drops whole rows: a row of junk gives 0 and a zero gradient.
    junk_row = np.stack([p[0], np.full(4, junk)]).astype(np.float32)
    rows = np.array([True, False])
    v, g = jax.value_and_grad(lambda p: jnp.sum(jaxce.entropy(p, where=rows)))(junk_row)
    np.testing.assert_allclose(v, h[0], **F32)
    np.testing.assert_array_equal(np.asarray(g)[1], 0.0)


# ------------------------------------------------------------------------------------------
# Empty batches and empty class axes: empty results, and 0 for a sum over no classes

EMPTY = [((0, 3), -1), ((3, 0), 0), ((2, 0), -1), ((0, 0), -1), ((0,), -1), ((2, 0, 3), (1, 2))]
MEASURES = [
    (jaxce.entropy, 1),
    (jaxce.cross_entropy, 2),
    (jaxce.kl_divergence, 2),
    (jaxce.softmax_entropy, 1),
    (jaxce.softmax_kl_divergence, 2),
]


@pytest.mark.parametrize("shape,axis", EMPTY)
@pytest.mark.parametrize("masked", [False, True])
def test_empty_inputs(shape, axis, masked):
    x = jnp.full(shape, 0.5)
    where = jnp.ones(shape, bool) if masked else None
    axes = tuple(a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis))
    batch = tuple(d for i, d in enumerate(shape) if i not in axes)
    for f, arity in MEASURES:
        out = f(*[x] * arity, axis, where=where)
        assert out.shape == batch and out.dtype == jnp.float32, f.__name__
        np.testing.assert_array_equal(out, np.zeros(batch), err_msg=f.__name__)
        grads = jax.grad(lambda *a: jnp.sum(f(*a, axis, where=where)), range(arity))(*[x] * arity)
        for g in grads:
            assert g.shape == shape and np.isfinite(np.asarray(g)).all(), f.__name__
    out = jaxce.information(x, base=2)
    assert out.shape == shape and out.dtype == jnp.float32
    assert jax.grad(lambda x: jnp.sum(jaxce.information(x)))(x).shape == shape
