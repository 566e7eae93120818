"""Tests for the softmax family: values against SciPy float64, masks, -inf, huge logits, bf16,
and the closed-form Jacobian against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp

import jaxce

F32 = dict(rtol=2e-6, atol=1e-7)


def masked_np(x, mask):
    """float64 copy of x with masked entries set to -inf (SciPy's view of a mask)."""
    x = np.asarray(x, np.float64)
    return x if mask is None else np.where(mask, x, -np.inf)


# ------------------------------------------------------------------------------------------
# REFERENCE.md section 1 numbers


def test_reference_softmax_210():
    p = jaxce.softmax(jnp.array([2.0, 1.0, 0.0]))
    np.testing.assert_allclose(p, [0.66524096, 0.24472847, 0.09003057], rtol=1e-6)
    assert p.dtype == jnp.float32
    np.testing.assert_allclose(jaxce.logsumexp(jnp.array([2.0, 1.0, 0.0])), 2.40760596, rtol=1e-7)
    np.testing.assert_allclose(
        jaxce.log_softmax(jnp.array([2.0, 1.0, 0.0])),
        np.log([0.66524096, 0.24472847, 0.09003057]),
        rtol=1e-6,
    )


def test_reference_dog_cat_rabbit():
    z = jnp.array([4.0, 2.0, -2.0])
    p = jaxce.softmax(z)
    np.testing.assert_allclose(p, [0.87887824, 0.11894324, 0.00217852], rtol=1e-6)
    np.testing.assert_allclose(float(p.sum()), 1.0, rtol=1e-6)
    assert int(jnp.argmax(p)) == 0  # largest input gets the largest probability
    # Per-class sigmoids are not a distribution: they sum to more than 1.
    s = jax.nn.sigmoid(z)
    np.testing.assert_allclose(s, [0.98201379, 0.88079708, 0.11920292], rtol=1e-6)
    assert float(s.sum()) > 1.5
    # The logit of p is log(p / (1 - p)); the sigmoid inverts it.
    np.testing.assert_allclose(jnp.log(s / (1 - s)), z, rtol=1e-5)


def test_log_softmax_equals_log_of_softmax_and_stays_finite_where_softmax_underflows():
    z = jnp.array([0.0, -200.0, 10.0])
    # x - lse loses the float32 ulp of lse (about 1e-6 at 10): an absolute tolerance.
    ref = sp.log_softmax([0.0, -200.0, 10.0])
    np.testing.assert_allclose(jaxce.log_softmax(z), ref, rtol=2e-6, atol=1e-6)
    # softmax underflows to 0 for -210 in float32, log_softmax does not go through it.
    assert float(jaxce.softmax(z)[1]) == 0.0
    np.testing.assert_allclose(float(jaxce.log_softmax(z)[1]), -210.0000453989, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Values against SciPy, int and tuple axes, keepdims

AXES = [
    ((5,), -1),
    ((3, 5), -1),
    ((3, 5), 0),
    ((2, 3, 4), 1),
    ((2, 3, 4), (0, 2)),
    ((2, 3, 4), (1, 2)),
    ((2, 3, 4), (-1, -2)),
    ((2, 3, 4), (0, 1, 2)),
]


@pytest.mark.parametrize("shape,axis", AXES)
def test_softmax_family_vs_scipy(rng, shape, axis):
    x = rng.normal(size=shape).astype(np.float32) * 3
    ax = axis if isinstance(axis, int) else tuple(axis)
    np.testing.assert_allclose(jaxce.softmax(x, axis), sp.softmax(x.astype(np.float64), ax), **F32)
    np.testing.assert_allclose(
        jaxce.log_softmax(x, axis), sp.log_softmax(x.astype(np.float64), ax), rtol=2e-6, atol=2e-6
    )
    for keepdims in (False, True):
        out = jaxce.logsumexp(x, axis, keepdims=keepdims)
        ref = sp.logsumexp(x.astype(np.float64), ax, keepdims=keepdims)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, **F32)


def test_softmax_family_under_jit_and_vmap(rng):
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    ref = sp.softmax(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(jax.jit(jaxce.softmax)(x), ref, **F32)
    np.testing.assert_allclose(jax.vmap(jaxce.softmax)(x), ref, **F32)
    lse = jax.vmap(lambda r: jaxce.logsumexp(r, (0, 1)))(x)
    np.testing.assert_allclose(lse, sp.logsumexp(x.astype(np.float64), axis=(1, 2)), **F32)


# ------------------------------------------------------------------------------------------
# where masks

MASKS = {
    # name: mask for a (3, 4) input
    "full": np.array(
        [[True, False, True, True], [False, False, False, False], [True, True, True, False]]
    ),
    "classes": np.array([True, False, True, True]),  # (K,) broadcasts over rows
    "batch": np.array([True, False, True]),  # batch shape (3,): masks whole rows (optax)
    "column": np.array([[True], [False], [True]]),
}


def expanded(name):
    m = MASKS[name]
    if name == "batch":
        m = m[:, None]
    return np.broadcast_to(m, (3, 4))


@pytest.mark.parametrize("name", list(MASKS))
def test_where_values_vs_scipy(rng, name):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    where, m = jnp.asarray(MASKS[name]), expanded(name)
    xm = masked_np(x, m)
    full_rows = m.any(axis=-1)
    with np.errstate(invalid="ignore"):
        ref_p = np.where(full_rows[:, None], sp.softmax(xm, axis=-1), 0.0)
    ref_lse = sp.logsumexp(xm, axis=-1)  # -inf on a fully masked row
    ref_logp = np.where(m, xm - np.where(full_rows, ref_lse, 0.0)[:, None], -np.inf)
    p = jaxce.softmax(x, where=where)
    np.testing.assert_allclose(p, ref_p, **F32)
    np.testing.assert_array_equal(np.asarray(p)[~m], 0.0)
    np.testing.assert_allclose(jaxce.log_softmax(x, where=where), ref_logp, **F32)
    np.testing.assert_allclose(jaxce.logsumexp(x, where=where), ref_lse, **F32)
    np.testing.assert_allclose(
        jaxce.logsumexp(x, where=where, keepdims=True), ref_lse[:, None], **F32
    )


@pytest.mark.parametrize("name", list(MASKS))
def test_where_gradients_zero_on_masked_entries_and_rows(rng, name):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    c = rng.normal(size=(3, 4)).astype(np.float32)
    where, m = jnp.asarray(MASKS[name]), expanded(name)
    full_rows = m.any(axis=-1)
    xm = masked_np(x, m)
    with np.errstate(invalid="ignore"):
        p = np.where(full_rows[:, None], sp.softmax(xm, axis=-1), 0.0)

    # d lse / dx = p (0 on masked entries and on a fully masked row, whose lse is -inf).
    g = jax.grad(lambda x: jaxce.logsumexp(x, where=where).sum())(x)
    np.testing.assert_allclose(g, p, **F32)
    # d <c, softmax> / dx = p * (c - <p, c>)
    g = jax.grad(lambda x: jnp.sum(c * jaxce.softmax(x, where=where)))(x)
    ref = p * (c - np.sum(p * c, axis=-1, keepdims=True))
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
    # d <c, log_softmax> / dx on unmasked entries = c - p * sum(c); masked entries excluded.
    cm = np.where(m, c, 0.0)
    g = jax.grad(lambda x: jnp.sum(jnp.where(m, cm * jaxce.log_softmax(x, where=where), 0.0)))(x)
    ref = np.where(m, cm - p * cm.sum(-1, keepdims=True), 0.0)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(g)).all()


def test_fully_masked_row_values_and_zero_gradient():
    x = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    where = jnp.array([[False, False, False], [True, True, True]])
    np.testing.assert_array_equal(jaxce.softmax(x, where=where)[0], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(jaxce.log_softmax(x, where=where)[0], [-np.inf] * 3)
    lse = jaxce.logsumexp(x, where=where)
    assert float(lse[0]) == -np.inf
    g = jax.grad(lambda x: jaxce.logsumexp(x, where=where)[0])(x)
    np.testing.assert_array_equal(g, np.zeros((2, 3)))
    # jax.nn.logsumexp on the same all -inf row has a NaN gradient (jax issue 6811);
    # ours is 0.
    g = jax.grad(lambda x: jaxce.logsumexp(x)[0])(jnp.full((1, 3), -jnp.inf))
    np.testing.assert_array_equal(g, np.zeros((1, 3)))


def test_all_neg_inf_rows():
    x = jnp.array([[-jnp.inf, -jnp.inf, -jnp.inf], [-jnp.inf, 0.0, 1.0]])
    p = jaxce.softmax(x)
    np.testing.assert_array_equal(p[0], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(p[1], sp.softmax([-np.inf, 0.0, 1.0]), **F32)
    lp = jaxce.log_softmax(x)
    np.testing.assert_array_equal(lp[0], [-np.inf] * 3)
    np.testing.assert_allclose(lp[1], sp.log_softmax([-np.inf, 0.0, 1.0]), **F32)
    lse = jaxce.logsumexp(x)
    assert float(lse[0]) == -np.inf
    np.testing.assert_allclose(float(lse[1]), sp.logsumexp([0.0, 1.0]), rtol=1e-6)
    g = jax.grad(lambda x: jaxce.logsumexp(x).sum())(x)
    np.testing.assert_allclose(g, [[0.0, 0.0, 0.0], sp.softmax([-np.inf, 0.0, 1.0])], **F32)
    c = jnp.array([1.0, -2.0, 0.5])
    g = jax.grad(lambda x: jnp.sum(c * jaxce.softmax(x)))(x)
    q = sp.softmax([-np.inf, 0.0, 1.0])
    np.testing.assert_allclose(g, [[0.0, 0.0, 0.0], q * (np.asarray(c) - q @ np.asarray(c))], **F32)


# ------------------------------------------------------------------------------------------
# Huge logits


HUGE = [
    [1e4, -1e4, 0.0],
    [1e4, 1e4, -1e4],
    [-1e4, -1e4, -1e4],
    [3e38, -3e38, 0.0],
    [3e38, 3e38, 3e38],
    [-3e38, -3e38, -3e38],
    [3e38, 3e38 * 0.999, -3e38],
]


@pytest.mark.parametrize("x", HUGE)
def test_huge_logits_finite_values_and_gradients(x):
    xf = jnp.array(x, jnp.float32)
    outs = [jaxce.softmax(xf), jaxce.logsumexp(xf), jaxce.log_softmax(xf)[0]]
    assert all(np.isfinite(np.asarray(o)).all() for o in outs)
    for f in (
        lambda x: jaxce.logsumexp(x),
        lambda x: jaxce.softmax(x)[0],
        lambda x: jaxce.log_softmax(x)[0],
    ):
        assert np.isfinite(np.asarray(jax.grad(f)(xf))).all()


@pytest.mark.parametrize("x", HUGE)
def test_huge_logits_accurate(x):
    xf = jnp.array(x, jnp.float32)
    x64 = np.asarray(xf, np.float64)  # the float32-rounded inputs, exactly
    np.testing.assert_allclose(jaxce.softmax(xf), sp.softmax(x64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(jaxce.logsumexp(xf)), sp.logsumexp(x64), rtol=1e-6)
    lp = np.asarray(jaxce.log_softmax(xf), np.float64)
    with np.errstate(over="ignore"):
        ref = sp.log_softmax(x64)  # (x - max) - log sum exp(x - max): no rounding of lse
    big = np.abs(ref) > np.finfo(np.float32).max  # overflows float32: -inf is correct
    np.testing.assert_array_equal(lp[big], -np.inf)
    np.testing.assert_allclose(lp[~big], ref[~big], rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda x: jaxce.logsumexp(x))(xf)
    np.testing.assert_allclose(g, sp.softmax(x64), rtol=1e-6, atol=1e-7)


def test_pos_inf_logsumexp_is_inf():
    assert float(jaxce.logsumexp(jnp.array([jnp.inf, 0.0, 1.0]))) == np.inf


def test_pos_inf_row_is_nan_not_a_probability_above_one():
    z = jnp.array([jnp.inf, 0.0, 1.0])
    p = np.asarray(jaxce.softmax(z))
    lp = np.asarray(jaxce.log_softmax(z))
    assert np.isnan(p[0]) and not np.any(p > 1)
    assert np.isnan(lp[0]) and not np.any(lp > 0)


# ------------------------------------------------------------------------------------------
# Low precision


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtypes(rng, dtype):
    x = jnp.asarray(rng.normal(size=(3, 6)) * 4, dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    p = jaxce.softmax(x)
    lp = jaxce.log_softmax(x)
    lse = jaxce.logsumexp(x)
    for out in (p, lp, lse):
        assert out.dtype == dtype
        assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()
    np.testing.assert_allclose(p.astype(jnp.float32), sp.softmax(x64, -1), **tol)
    np.testing.assert_allclose(lp.astype(jnp.float32), sp.log_softmax(x64, -1), **tol)
    np.testing.assert_allclose(lse.astype(jnp.float32), sp.logsumexp(x64, -1), **tol)
    g = jax.grad(lambda x: jaxce.logsumexp(x).astype(jnp.float32).sum())(x)
    assert g.dtype == dtype
    np.testing.assert_allclose(g.astype(jnp.float32), sp.softmax(x64, -1), **tol)
    # Huge low-precision logits stay finite.
    big = jnp.asarray([6e4, -6e4, 0.0], jnp.float16 if dtype == jnp.float16 else dtype)
    assert np.isfinite(np.asarray(jaxce.logsumexp(big).astype(jnp.float32)))
    np.testing.assert_allclose(jaxce.softmax(big).astype(jnp.float32), [1.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------
# softmax_jacobian


def closed_form_jacobian(x, axis=-1):
    """float64 diag(p) - p p^T over the last axis."""
    p = sp.softmax(np.asarray(x, np.float64), axis=axis)
    return np.einsum("...i,ij->...ij", p, np.eye(p.shape[-1])) - p[..., :, None] * p[..., None, :]


def test_jacobian_reference_section_3():
    x = jnp.array([2.0, 1.0, 0.0])
    j = np.asarray(jaxce.softmax_jacobian(x), np.float64)
    p = np.array([0.66524096, 0.24472847, 0.09003057])
    np.testing.assert_allclose(np.diag(j), p * (1 - p), rtol=1e-5)
    np.testing.assert_allclose(j[0, 1], -p[0] * p[1], rtol=1e-5)
    np.testing.assert_allclose(j[2, 0], -p[2] * p[0], rtol=1e-5)
    np.testing.assert_allclose(j.sum(axis=0), 0.0, atol=1e-7)  # columns sum to 0
    np.testing.assert_allclose(j, j.T, atol=1e-7)


def test_jacobian_int_axis_vs_autodiff(rng):
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    jac = jaxce.softmax_jacobian(x)
    assert jac.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(jac, closed_form_jacobian(x), **F32)
    per_slice = lambda f: jax.jit(jax.vmap(jax.vmap(f(jaxce.softmax))))(x)
    np.testing.assert_allclose(jac, per_slice(jax.jacfwd), **F32)
    np.testing.assert_allclose(jac, per_slice(jax.jacrev), **F32)


def test_jacobian_axis_0_vs_autodiff(rng):
    x = rng.normal(size=(3, 2)).astype(np.float32)
    jac = jaxce.softmax_jacobian(x, axis=0)
    assert jac.shape == (2, 3, 3)  # batch (2,) + class (3,) + class (3,)
    np.testing.assert_allclose(jac, closed_form_jacobian(x.T), **F32)
    full = jax.jit(jax.jacfwd(lambda x: jaxce.softmax(x, axis=0)))(x)  # [i, b, j, c]
    np.testing.assert_allclose(jac, np.stack([full[:, b, :, b] for b in range(2)]), **F32)


def test_jacobian_tuple_axis_vs_autodiff(rng):
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    jac = jaxce.softmax_jacobian(x, axis=(1, 2))
    assert jac.shape == (2, 3, 4, 3, 4)
    ref = closed_form_jacobian(x.reshape(2, 12)).reshape(2, 3, 4, 3, 4)
    np.testing.assert_allclose(jac, ref, **F32)
    f = lambda s: jaxce.softmax(s, axis=(0, 1))
    np.testing.assert_allclose(jac, jax.jit(jax.vmap(jax.jacfwd(f)))(x), **F32)
    np.testing.assert_allclose(jac, jax.jit(jax.vmap(jax.jacrev(f)))(x), **F32)


def test_softmax_jvp_matches_closed_form_jacobian(rng):
    x = rng.normal(size=(5,)).astype(np.float32)
    v = rng.normal(size=(5,)).astype(np.float32)
    _, tangent = jax.jvp(jaxce.softmax, (x,), (v,))
    np.testing.assert_allclose(tangent, closed_form_jacobian(x) @ v.astype(np.float64), **F32)


# ------------------------------------------------------------------------------------------
# Bad input

BAD = [
    (lambda: jaxce.softmax(jnp.array([1, 2, 3])), TypeError, r"real floating dtype, got int32"),
    (lambda: jaxce.log_softmax(jnp.array([1j, 2j])), TypeError, r"real floating dtype, got complex"),
    (lambda: jaxce.logsumexp(jnp.array([True])), TypeError, r"real floating dtype, got bool"),
    (lambda: jaxce.softmax(jnp.ones((2, 3)), axis=2), ValueError, r"axis 2 is out of range .* rank 2"),
    (lambda: jaxce.softmax(jnp.ones((2, 3)), axis=-3), ValueError, r"axis -3 is out of range"),
    (lambda: jaxce.logsumexp(jnp.ones((2, 3)), (0, 5)), ValueError, r"axis 5 is out of range"),
    (lambda: jaxce.log_softmax(jnp.ones((2, 3)), (1, -1)), ValueError, r"repeats an axis"),
    (lambda: jaxce.softmax(jnp.ones((2, 3)), ()), ValueError, r"at least one axis"),
    (lambda: jaxce.softmax(jnp.ones(3), 0.5), TypeError, r"int or a tuple of ints, got 0.5"),
    (
        lambda: jaxce.softmax(jnp.ones(3), where=jnp.array([1, 0, 1])),
        TypeError,
        r"boolean mask, got dtype int32",
    ),
    (
        lambda: jaxce.softmax(jnp.ones((2, 3)), where=jnp.ones(4, bool)),
        ValueError,
        r"where shape \(4,\) is not broadcastable to the input shape \(2, 3\)",
    ),
    (lambda: jaxce.softmax_jacobian(jnp.arange(3)), TypeError, r"real floating dtype"),
    (lambda: jaxce.softmax_jacobian(jnp.ones(3), 1), ValueError, r"out of range"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------------------------
# Masked entries holding NaN or inf take no part; empty batches and empty class axes

MASK_24 = np.array([[True, True, False, True], [False, True, True, False]])


@pytest.mark.parametrize("junk", [np.nan, np.inf, -np.inf, 1e30])
def test_masked_junk_reaches_no_value_or_gradient(rng, junk):
    x = np.where(MASK_24, rng.normal(size=(2, 4)), junk).astype(np.float32)
    c = rng.normal(size=(2, 4)).astype(np.float32)
    xm = masked_np(x, MASK_24)
    p = sp.softmax(xm, axis=-1)
    cm = np.where(MASK_24, c, 0.0)
    log_p = np.where(MASK_24, xm - sp.logsumexp(xm, axis=-1, keepdims=True), 0.0)
    cases = [  # (function, float64 value, float64 gradient of its sum)
        (lambda x: jaxce.logsumexp(x, where=MASK_24), sp.logsumexp(xm, axis=-1), p),
        (
            lambda x: c * jaxce.softmax(x, where=MASK_24),
            c * p,
            p * (c - np.sum(p * c, -1, keepdims=True)),
        ),
        (
            lambda x: jnp.where(MASK_24, cm * jaxce.log_softmax(x, where=MASK_24), 0.0),
            cm * log_p,
            cm - p * cm.sum(-1, keepdims=True),
        ),
    ]
    for f, value, grad in cases:
        np.testing.assert_allclose(f(x), value, **F32)
        g = np.asarray(jax.grad(lambda x: jnp.sum(f(x)))(x))
        np.testing.assert_array_equal(g[~MASK_24], 0.0)
        np.testing.assert_allclose(g, grad, rtol=1e-5, atol=1e-6)


EMPTY = [  # (shape, axis): an empty batch, K = 0, or both
    ((0, 3), -1),
    ((3, 0), 0),
    ((2, 0), -1),
    ((0, 0), -1),
    ((0,), -1),
    ((2, 0, 3), (1, 2)),
]


@pytest.mark.parametrize("shape,axis", EMPTY)
@pytest.mark.parametrize("masked", [False, True])
def test_empty_inputs(shape, axis, masked):
    x = jnp.zeros(shape)
    where = jnp.ones(shape, bool) if masked else None
    axes = tuple(a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis))
    batch = tuple(d for i, d in enumerate(shape) if i not in axes)
    classes = tuple(shape[i] for i in axes)
    # logsumexp of no classes is log 0 = -inf, as jax.nn.logsumexp gives.
    lse = jaxce.logsumexp(x, axis, where=where)
    assert lse.shape == batch and lse.dtype == jnp.float32
    np.testing.assert_array_equal(lse, np.full(batch, -np.inf))
    np.testing.assert_array_equal(lse, jax.nn.logsumexp(x, axis))
    kept = jaxce.logsumexp(x, axis, where=where, keepdims=True)
    assert kept.shape == tuple(1 if i in axes else d for i, d in enumerate(shape))
    for f in (jaxce.softmax, jaxce.log_softmax):
        out = f(x, axis, where=where)
        assert out.shape == shape and out.dtype == jnp.float32
    assert jaxce.softmax_jacobian(x, axis).shape == batch + classes + classes
    funcs = [
        lambda x: jaxce.logsumexp(x, axis, where=where),
        lambda x: jaxce.softmax(x, axis, where=where),
        lambda x: jaxce.log_softmax(x, axis, where=where),
        lambda x: jaxce.softmax_jacobian(x, axis),
    ]
    for f in funcs:
        g = jax.grad(lambda x: jnp.sum(f(x)))(x)
        assert g.shape == shape and np.isfinite(np.asarray(g)).all()
