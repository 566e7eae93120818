"""Hypothesis properties of the softmax family, the information measures and the losses."""

import math

import jax
import numpy as np
import scipy.special as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxce

SETTINGS = settings(deadline=None, max_examples=30)

# Few distinct shapes: every new shape costs a compile.
SHAPES = st.sampled_from([(3,), (2, 4), (3, 2)])


@st.composite
def logits(draw, shape=None, low=-30.0, high=30.0):
    shape = draw(SHAPES) if shape is None else shape
    size = int(np.prod(shape))
    values = draw(
        st.lists(
            st.floats(low, high, allow_nan=False, width=32), min_size=size, max_size=size
        )
    )
    return np.array(values, np.float32).reshape(shape)


@st.composite
def distribution(draw, shape, zeros=True):
    """A probability vector along the last axis; with ``zeros``, some entries exactly 0."""
    size = int(np.prod(shape))
    entry = st.floats(1e-3, 1.0)
    if zeros:
        entry = st.one_of(st.just(0.0), entry)
    values = np.array(draw(st.lists(entry, min_size=size, max_size=size))).reshape(shape)
    values[..., 0] += 1e-3  # never an all-zero row
    return (values / values.sum(-1, keepdims=True)).astype(np.float32)


@st.composite
def p_and_q(draw):
    shape = draw(SHAPES)
    return draw(distribution(shape)), draw(distribution(shape, zeros=False))


SHIFT = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@SETTINGS
@given(x=logits(), c=SHIFT)
def test_shift_invariance(x, c):
    xc = (x.astype(np.float64) + c).astype(np.float32)
    c_eff = xc.astype(np.float64) - x.astype(np.float64)  # the shift float32 actually applied
    # After rounding to float32 the shift is c up to ulp(|x| + |c|) per entry.
    tol = 4 * np.spacing(np.float32(np.abs(x).max() + abs(c))).astype(np.float64)
    np.testing.assert_allclose(jaxce.softmax(xc), jaxce.softmax(x), atol=tol + 1e-6)
    np.testing.assert_allclose(
        jaxce.log_softmax(xc), jaxce.log_softmax(x), atol=tol + 2e-6 * (1 + np.abs(x).max())
    )
    np.testing.assert_allclose(
        np.asarray(jaxce.logsumexp(xc), np.float64),
        sp.logsumexp(x.astype(np.float64) + c_eff, -1),
        rtol=1e-6,
        atol=tol + 1e-6,
    )
    y = sp.softmax(np.ones_like(x, np.float64), -1).astype(np.float32)
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy(xc, y), jaxce.softmax_cross_entropy(x, y), atol=tol + 1e-5
    )


@SETTINGS
@given(x=logits(low=-1e4, high=1e4))
def test_softmax_is_a_distribution(x):
    p = np.asarray(jaxce.softmax(x), np.float64)
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    lp = np.asarray(jaxce.log_softmax(x))
    assert np.all(lp <= 0)
    # The largest input gets the largest probability (probabilities may tie where the inputs
    # differ by less than float32 resolves after exp, e.g. -1e-38 and 0).
    top = np.take_along_axis(p, np.argmax(np.asarray(x), -1)[..., None], -1)[..., 0]
    assert np.all(top == p.max(-1))


@SETTINGS
@given(pq=p_and_q(), base=st.sampled_from([None, 2, 10]))
def test_information_inequalities(pq, base):
    p, q = pq
    k = p.shape[-1]
    scale = 1.0 if base is None else math.log(base)
    h = np.asarray(jaxce.entropy(p, base=base), np.float64)
    kl = np.asarray(jaxce.kl_divergence(p, q, base=base), np.float64)
    ce = np.asarray(jaxce.cross_entropy(p, q, base=base), np.float64)
    assert np.all(h >= 0) and np.all(h <= math.log(k) / scale + 1e-6)  # 0 <= H <= log K
    assert np.all(kl >= -1e-6)  # Gibbs
    assert np.all(ce >= h - 1e-5)  # cross-entropy >= entropy
    np.testing.assert_allclose(ce, h + kl, rtol=1e-5, atol=1e-5)  # H(p, q) = H(p) + KL
    np.testing.assert_allclose(jaxce.kl_divergence(p, p, base=base), 0.0, atol=1e-6)
    np.testing.assert_allclose(jaxce.kl_divergence(q, q, base=base), 0.0, atol=1e-6)


@SETTINGS
@given(data=st.data())
def test_logit_measures_agree_with_probability_measures(data):
    shape = data.draw(SHAPES)
    zp = data.draw(logits(shape, -10.0, 10.0))
    zq = data.draw(logits(shape, -10.0, 10.0))
    h = np.asarray(jaxce.softmax_entropy(zp), np.float64)
    kl = np.asarray(jaxce.softmax_kl_divergence(zp, zq), np.float64)
    assert np.all(h >= -1e-6) and np.all(kl >= -1e-6)
    p, q = sp.softmax(zp.astype(np.float64), -1), sp.softmax(zq.astype(np.float64), -1)
    np.testing.assert_allclose(h, -sp.xlogy(p, p).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kl, sp.rel_entr(p, q).sum(-1), rtol=1e-4, atol=1e-5)
    # Cross-entropy with soft labels is H(p) + KL(p || q) computed from logits.
    ce = np.asarray(jaxce.softmax_cross_entropy(zq, p.astype(np.float32)), np.float64)
    np.testing.assert_allclose(ce, h + kl, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jaxce.softmax_kl_divergence(zp, zp), 0.0, atol=1e-5)


@SETTINGS
@given(data=st.data())
def test_cross_entropy_gradient_is_p_times_mass_minus_y(data):
    shape = data.draw(SHAPES)
    z = data.draw(logits(shape, -20.0, 20.0))
    y = data.draw(distribution(shape))
    y = y * np.float32(data.draw(st.sampled_from([1.0, 0.5, 3.0])))
    g = jax.grad(lambda z: jaxce.softmax_cross_entropy(z, y).sum())(z)
    p = sp.softmax(z.astype(np.float64), -1)
    y64 = y.astype(np.float64)
    np.testing.assert_allclose(g, p * y64.sum(-1, keepdims=True) - y64, rtol=1e-5, atol=1e-6)


IGNORE = -1


@st.composite
def nll_case(draw):
    n, k = draw(st.sampled_from([(3, 4), (5, 2)]))
    z = draw(logits((n, k), -20.0, 20.0))
    labels = np.array(draw(st.lists(st.integers(-1, k - 1), min_size=n, max_size=n)))
    opts = {}
    if draw(st.booleans()):
        opts["ignore_index"] = IGNORE
    else:
        labels = np.where(labels == IGNORE, 0, labels)
    if draw(st.booleans()):
        opts["where"] = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if draw(st.booleans()):
        w = draw(st.lists(st.floats(0.1, 3.0), min_size=k, max_size=k))
        opts["class_weights"] = np.array(w, np.float32)
    if draw(st.booleans()):
        w = draw(st.lists(st.floats(0.0, 3.0), min_size=n, max_size=n))
        opts["sample_weights"] = np.array(w, np.float32)
    opts["reduction"] = draw(st.sampled_from(["none", "sum", "mean"]))
    opts["base"] = draw(st.sampled_from([None, 2, 10]))
    return z, labels, opts


@SETTINGS
@given(case=nll_case())
def test_nll_of_log_softmax_equals_integer_cross_entropy(case):
    z, labels, opts = case
    where = opts.get("where")
    nll = jaxce.nll_loss(jaxce.log_softmax(z, where=where), labels, **opts)
    ce = jaxce.softmax_cross_entropy_with_integer_labels(z, labels, **opts)
    np.testing.assert_allclose(nll, ce, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(ce)).all()
