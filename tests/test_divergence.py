"""jaxce.softmax_divergence: forward KL, reverse KL and JSD between two softmaxes.

Values against a float64 NumPy reference written here (scipy's log_softmax, 0 log 0 = 0);
gradients of both arguments against ``jax.grad`` of the plain ``jax.numpy`` formulas in float64
(finite inputs) and against the closed forms in NumPy (-inf classes, masks); sharded results
against one device on 8 simulated CPU devices.
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

KINDS = ["forward_kl", "reverse_kl", "jsd"]


def np_log_softmax(z, mask, tau):
    z = np.where(mask, z / tau, -np.inf) if mask is not None else z / tau
    out = np.full(z.shape, -np.inf)
    for i, row in enumerate(z.reshape(-1, z.shape[-1])):
        if np.any(row > -np.inf):
            out.reshape(-1, z.shape[-1])[i] = scipy.special.log_softmax(row)
    return out


def np_kl(log_p, log_q):
    """sum p (log p - log q), 0 where p = 0, +inf where p > 0 = q."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return terms.sum(-1)


def np_divergence(zs, zt, kind, beta=0.5, tau=1.0, mask=None):
    ls, lt = np_log_softmax(zs, mask, tau), np_log_softmax(zt, mask, tau)
    if kind == "forward_kl":
        return np_kl(lt, ls)
    if kind == "reverse_kl":
        return np_kl(ls, lt)
    lm = np.logaddexp(np.log(beta) + lt, np.log1p(-beta) + ls)
    return beta * np_kl(lt, lm) + (1 - beta) * np_kl(ls, lm)


def plain_divergence(zs, zt, kind, beta=0.5, tau=1.0):
    """The textbook formulas in jax.numpy, for autodiff (finite logits only)."""
    ls, lt = jax.nn.log_softmax(zs / tau), jax.nn.log_softmax(zt / tau)
    kl = lambda lp, lq: jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
    if kind == "forward_kl":
        return kl(lt, ls)
    if kind == "reverse_kl":
        return kl(ls, lt)
    lm = jnp.log(beta * jnp.exp(lt) + (1 - beta) * jnp.exp(ls))
    return beta * kl(lt, lm) + (1 - beta) * kl(ls, lm)


def np_closed_form_grads(zs, zt, kind, beta, tau, mask, g):
    """The closed forms of jaxce/_divergence.py, in NumPy float64, times the cotangent g."""
    ls, lt = np_log_softmax(zs, mask, tau), np_log_softmax(zt, mask, tau)
    ps, pt = np.exp(ls), np.exp(lt)
    value = np_divergence(zs, zt, kind, beta, tau, mask)[..., None]

    def times(p, a):  # p * a, 0 where p = 0
        with np.errstate(invalid="ignore"):
            return np.where(p > 0, p * a, 0.0)

    pull = lambda p, pa: pa - p * pa.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        # an infinite KL: the side that enters as -log has no defined gradient (NaN)
        undefined = np.where(np.isfinite(value), 0.0, np.nan)
        if kind == "forward_kl":
            ds = ps * pt.sum(-1, keepdims=True) - pt
            dt = times(pt, lt - ls) - pt * value + undefined
        elif kind == "reverse_kl":
            ds = times(ps, ls - lt) - ps * value + undefined
            dt = pt * ps.sum(-1, keepdims=True) - ps
        else:
            lm = np.logaddexp(np.log(beta) + lt, np.log1p(-beta) + ls)
            ds = (1 - beta) * pull(ps, times(ps, ls - lm))
            dt = beta * pull(pt, times(pt, lt - lm))
    return g[..., None] * ds / tau, g[..., None] * dt / tau


def random_logits(shape, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype(np.float32), (
        scale * rng.standard_normal(shape)
    ).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Values and gradients against float64 references.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_values_and_gradients_match_autodiff_of_the_plain_formulas(kind, tau, beta):
    zs, zt = random_logits((5, 7), seed=1)
    g = np.random.default_rng(2).standard_normal(5)
    with jax.enable_x64(True):
        zs64, zt64, g64 = (jnp.asarray(a, jnp.float64) for a in (zs, zt, g))
        ours = lambda a, b: jnp.sum(
            g64 * jaxce.softmax_divergence(a, b, kind=kind, beta=beta, temperature=tau)
        )
        plain = lambda a, b: jnp.sum(g64 * plain_divergence(a, b, kind, beta, tau))
        value = jaxce.softmax_divergence(zs64, zt64, kind=kind, beta=beta, temperature=tau)
        np.testing.assert_allclose(value, np_divergence(zs64, zt64, kind, beta, tau), rtol=1e-12)
        got = jax.grad(ours, argnums=(0, 1))(zs64, zt64)
        want = jax.grad(plain, argnums=(0, 1))(zs64, zt64)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # float32 against the same reference
    value32 = jaxce.softmax_divergence(zs, zt, kind=kind, beta=beta, temperature=tau)
    assert value32.dtype == jnp.float32
    np.testing.assert_allclose(value32, np_divergence(zs, zt, kind, beta, tau), rtol=2e-5, atol=1e-6)


def test_forward_kl_student_gradient_is_p_student_minus_p_teacher_over_tau():
    zs, zt = random_logits((3, 6), seed=3)
    grad = jax.grad(lambda a: jnp.sum(jaxce.softmax_divergence(a, zt, temperature=2.0)))(zs)
    want = (scipy.special.softmax(zs / 2.0, -1) - scipy.special.softmax(zt / 2.0, -1)) / 2.0
    np.testing.assert_allclose(grad, want, atol=1e-6)


def test_identical_softmaxes_have_zero_divergence_and_gradient():
    zs, _ = random_logits((4, 5), seed=4)
    for kind in KINDS:
        total = functools.partial(
            lambda a, b, kind: jnp.sum(jaxce.softmax_divergence(a, b, kind=kind)), kind=kind
        )
        value, grads = jax.value_and_grad(total, argnums=(0, 1))(zs, zs + 3.0)  # same softmax
        assert abs(value) < 1e-5
        for grad in grads:
            np.testing.assert_allclose(grad, 0.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# -inf logits, masks, huge logits, low precision.


def edge_logits():
    """Rows: (0) a class impossible for both, (1) teacher mass where the student has -inf,
    (2) student mass where the teacher has -inf, (3) disjoint supports, (4) huge logits."""
    inf = np.inf
    zs = np.array([
        [1.0, -inf, 0.5, -1.0],
        [0.3, -inf, 1.0, 0.0],
        [0.3, 2.0, 1.0, 0.0],
        [5.0, 1.0, -inf, -inf],
        [1e4, -1e4, 9990.0, 0.0],
    ], np.float32)
    zt = np.array([
        [0.0, -inf, 2.0, 1.0],
        [0.0, 1.0, 0.5, 0.2],
        [1.0, -inf, 0.0, 3.0],
        [-inf, -inf, 2.0, 0.0],
        [-1e4, 1e4, 9995.0, 5.0],
    ], np.float32)
    return zs, zt


@pytest.mark.parametrize("kind", KINDS)
def test_neg_inf_classes_give_the_reference_values_and_closed_form_gradients(kind):
    zs, zt = edge_logits()
    g = np.array([1.0, 0.5, -1.0, 2.0, 0.7])
    grads = jax.grad(
        lambda a, b: jnp.sum(g * jaxce.softmax_divergence(a, b, kind=kind, reduction="none")),
        argnums=(0, 1),
    )(zs, zt)
    per_row = jaxce.softmax_divergence(zs, zt, kind=kind)
    want = np_divergence(zs.astype(np.float64), zt.astype(np.float64), kind)
    np.testing.assert_allclose(per_row, want, rtol=1e-5)
    want_s, want_t = np_closed_form_grads(
        zs.astype(np.float64), zt.astype(np.float64), kind, 0.5, 1.0, None, g
    )
    # Row 4's reverse-KL gradient p (log p_s - log p_t - F) cancels terms of ~2e4 in float32.
    np.testing.assert_allclose(grads[0], want_s, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(grads[1], want_t, rtol=1e-5, atol=1e-4)
    # A class impossible for both takes no part: row 0 equals the row without class 1.
    np.testing.assert_allclose(
        per_row[0], jaxce.softmax_divergence(zs[0, [0, 2, 3]], zt[0, [0, 2, 3]], kind=kind),
        rtol=1e-6,
    )
    assert grads[0][0, 1] == grads[1][0, 1] == 0.0


def test_infinite_kls_and_their_gradients():
    zs, zt = edge_logits()
    forward = jaxce.softmax_divergence(zs, zt, kind="forward_kl")
    reverse = jaxce.softmax_divergence(zs, zt, kind="reverse_kl")
    assert forward[1] == jnp.inf and np.isfinite(forward[2])  # teacher mass where p_s = 0
    assert reverse[2] == jnp.inf and np.isfinite(reverse[1])  # student mass where p_t = 0
    assert forward[3] == reverse[3] == jnp.inf  # disjoint supports
    gs, gt = jax.grad(
        lambda a, b: jnp.sum(jaxce.softmax_divergence(a, b)[1]), argnums=(0, 1)
    )(zs, zt)
    # The student's gradient stays the closed form p_s - p_t; the teacher's is undefined (NaN).
    want = scipy.special.softmax(np.where(np.isinf(zs[1]), -np.inf, zs[1])) - scipy.special.softmax(zt[1])
    np.testing.assert_allclose(gs[1], want, atol=1e-6)
    assert np.all(np.isnan(gt[1])) and np.all(np.asarray(gt)[[0, 2, 3, 4]] == 0.0)


@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_jsd_of_disjoint_supports_is_the_binary_entropy_of_beta(beta):
    zs = np.array([[1.0, 2.0, -np.inf, -np.inf]], np.float32)
    zt = np.array([[-np.inf, -np.inf, 0.0, 3.0]], np.float32)
    value, grads = jax.value_and_grad(
        lambda a, b: jnp.sum(jaxce.softmax_divergence(a, b, kind="jsd", beta=beta)),
        argnums=(0, 1),
    )(zs, zt)
    np.testing.assert_allclose(value, -beta * np.log(beta) - (1 - beta) * np.log1p(-beta), rtol=1e-6)
    for grad in grads:  # each side's shape inside its own support does not matter
        np.testing.assert_allclose(grad, 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_class_and_example_masks(kind):
    zs, zt = random_logits((4, 6), seed=5)
    zs[0, 2] = np.nan  # junk in masked entries takes no part
    zt[3] = np.inf
    class_mask = np.array([True, True, False, True, True, True])
    examples = np.array([True, True, True, False])
    where = class_mask[None, :] & examples[:, None]
    g = np.array([1.0, -2.0, 0.5, 3.0])
    f = lambda a, b, where: jnp.sum(g * jaxce.softmax_divergence(a, b, kind=kind, where=where))
    grads = jax.grad(f, argnums=(0, 1))(zs, zt, where)
    per_row = jaxce.softmax_divergence(zs, zt, kind=kind, where=where)
    want = np_divergence(zs.astype(np.float64), zt.astype(np.float64), kind, mask=where)
    want[3] = 0.0
    np.testing.assert_allclose(per_row, want, rtol=1e-5, atol=1e-7)
    want_s, want_t = np_closed_form_grads(
        np.nan_to_num(zs.astype(np.float64)), np.nan_to_num(zt.astype(np.float64), posinf=0.0),
        kind, 0.5, 1.0, where, g,
    )
    np.testing.assert_allclose(grads[0], want_s, atol=1e-6)
    np.testing.assert_allclose(grads[1], want_t, atol=1e-6)
    assert np.all(grads[0][:, 2] == 0.0) and np.all(grads[1][3] == 0.0)
    # a batch-shaped mask masks whole examples; "mean" counts the unmasked ones
    mean = jaxce.softmax_divergence(
        zs[:, class_mask], zt[:, class_mask], kind=kind, where=examples, reduction="mean"
    )
    np.testing.assert_allclose(mean, want[:3].mean(), rtol=1e-5)
    # ... at no [N, K] cost, and junk in the left-out rows reaches no gradient either
    clean_s = np.where(np.isnan(zs), 0.3, zs)  # (row 0's masked class is counted here)
    junk_s = clean_s.copy()
    junk_s[3, 0] = np.nan
    want_s, want_t = np_closed_form_grads(
        clean_s.astype(np.float64), np.nan_to_num(zt.astype(np.float64), posinf=0.0),
        kind, 0.5, 1.0, np.broadcast_to(examples[:, None], zs.shape), g,
    )
    for rows in (examples, examples[:, None]):
        grads = jax.grad(f, argnums=(0, 1))(junk_s, zt, rows)
        assert np.all(grads[0][3] == 0.0) and np.all(grads[1][3] == 0.0)
        np.testing.assert_allclose(grads[0], want_s, atol=1e-6)
        np.testing.assert_allclose(grads[1], want_t, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_is_computed_in_float32(kind, dtype):
    zs, zt = random_logits((3, 50), seed=6, scale=4.0)
    zs[0, :5] = -np.inf
    zt[0, :5] = -np.inf
    a, b = jnp.asarray(zs, dtype), jnp.asarray(zt, dtype)
    value, grads = jax.value_and_grad(
        lambda a, b: jnp.sum(jaxce.softmax_divergence(a, b, kind=kind)), argnums=(0, 1)
    )(a, b)
    assert jaxce.softmax_divergence(a, b, kind=kind).dtype == jnp.float32
    want = np_divergence(np.asarray(a, np.float64), np.asarray(b, np.float64), kind)
    np.testing.assert_allclose(value, want.sum(), rtol=1e-5)
    want_s, want_t = np_closed_form_grads(
        np.asarray(a, np.float64), np.asarray(b, np.float64), kind, 0.5, 1.0, None, np.ones(3)
    )
    for grad, ref in zip(grads, (want_s, want_t)):
        assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))
        np.testing.assert_allclose(np.asarray(grad, np.float32), ref, atol=0.02 * np.abs(ref).max())


HUGE = 3e38  # near float32's largest finite number (3.4e38): z / tau overflows for tau < 0.9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [0.5, 0.25, 2.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_huge_finite_logits_with_a_temperature(kind, tau, dtype):
    """Logits near the dtype's largest number, whose differences (z - max) / tau are -inf or
    0, and z / tau may overflow: values and both gradients are the float64 ones, finite."""
    narrow = [HUGE, HUGE, 0.0, -HUGE]  # softmax [1/2, 1/2, 0, 0] at every tau here
    wide = [HUGE, HUGE, HUGE, -HUGE]  # [1/3, 1/3, 1/3, 0]
    # row 0: identical softmaxes; row 1: the side that enters as -log covers the other's
    # support, so every kind is finite
    wide_side, narrow_side = ([wide, wide], [wide, narrow])
    zs, zt = (wide_side, narrow_side) if kind == "forward_kl" else (narrow_side, wide_side)
    zs, zt = jnp.asarray(zs, dtype), jnp.asarray(zt, dtype)
    g = np.array([1.0, -2.0])
    value, grads = jax.value_and_grad(
        lambda a, b: jnp.sum(g * jaxce.softmax_divergence(a, b, kind=kind, temperature=tau)),
        argnums=(0, 1),
    )(zs, zt)
    per_row = jaxce.softmax_divergence(zs, zt, kind=kind, temperature=tau)
    f64 = lambda a: np.asarray(a, np.float64)
    want = np_divergence(f64(zs), f64(zt), kind, tau=tau)
    assert np.isfinite(want).all() and abs(want[0]) < 1e-12 and want[1] > 0.1
    np.testing.assert_allclose(per_row, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(value, (g * want).sum(), rtol=1e-6, atol=1e-7)
    want_grads = np_closed_form_grads(f64(zs), f64(zt), kind, 0.5, tau, None, g)
    for grad, ref in zip(grads, want_grads):
        assert grad.dtype == dtype and np.isfinite(f64(grad)).all()
        np.testing.assert_allclose(f64(grad), ref, atol=1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_opposite_huge_logits_with_a_temperature_above_one(kind):
    """z - max overflows (to -6e38) where (z - max) / tau does not (tau = 2): the KLs of 3e38
    and the float64 gradients, finite. (A guard on shifting before dividing: z / tau never
    overflowed here.)"""
    zs = np.array([[HUGE, -HUGE, 0.0]], np.float32)  # log p_s = [0, -3e38, -1.5e38]
    zt = np.array([[-HUGE, HUGE, 0.0]], np.float32)
    value, grads = jax.value_and_grad(
        lambda a, b: jnp.sum(jaxce.softmax_divergence(a, b, kind=kind, temperature=2.0)),
        argnums=(0, 1),
    )(zs, zt)
    f64 = lambda a: np.asarray(a, np.float64)
    want = np_divergence(f64(zs), f64(zt), kind, tau=2.0)
    assert np.isfinite(want).all() and want[0] > (3e38 if "kl" in kind else 0.69)
    np.testing.assert_allclose(value, want.sum(), rtol=1e-6)
    want_grads = np_closed_form_grads(f64(zs), f64(zt), kind, 0.5, 2.0, None, np.ones(1))
    for grad, ref in zip(grads, want_grads):
        assert np.isfinite(grad).all()
        np.testing.assert_allclose(grad, ref, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Second derivatives: jax.hessian is forward-over-reverse, through the custom VJP.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.5])
def test_hessians_match_autodiff_of_the_plain_formulas(kind, tau):
    zs, zt = random_logits((2, 5), seed=9)
    g = np.array([1.0, -0.5])
    with jax.enable_x64(True):
        zs64, zt64, g64 = (jnp.asarray(a, jnp.float64) for a in (zs, zt, g))
        ours = lambda a, b: jnp.sum(
            g64 * jaxce.softmax_divergence(a, b, kind=kind, beta=0.3, temperature=tau)
        )
        plain = lambda a, b: jnp.sum(g64 * plain_divergence(a, b, kind, 0.3, tau))
        got = jax.hessian(ours, argnums=(0, 1))(zs64, zt64)
        want = jax.hessian(plain, argnums=(0, 1))(zs64, zt64)
        for got_row, want_row in zip(got, want):  # student-student, student-teacher, ...
            for a, b in zip(got_row, want_row):
                assert a.shape == (2, 5, 2, 5)
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_forward_kl_hessian_in_the_student_is_the_softmax_jacobian_over_tau_squared(tau):
    """(diag(p_s) - p_s p_s^T) / tau^2; a class impossible for both (-inf) takes no part: 0 in
    its row and column."""
    s = jnp.array([1.0, 0.0, -1.0, -jnp.inf])
    t = jnp.array([2.0, 0.0, -2.0, -jnp.inf])
    hessian = jax.hessian(lambda z: jaxce.softmax_divergence(z, t, temperature=tau))(s)
    p = scipy.special.softmax(np.array([1.0, 0.0, -1.0, -np.inf]) / tau)
    np.testing.assert_allclose(hessian, (np.diag(p) - np.outer(p, p)) / tau**2, atol=1e-6)
    assert np.all(hessian[3] == 0.0) and np.all(hessian[:, 3] == 0.0)


# ----------------------------------------------------------------------------------------------
# Reductions, weights, base.


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions_sample_weights_and_base(reduction):
    zs, zt = random_logits((6, 5), seed=7)
    weights = np.array([1.0, 0.0, 2.0, 0.5, 1.5, 3.0], np.float32)
    rows = np_divergence(zs.astype(np.float64), zt.astype(np.float64), "jsd", 0.4, 1.5)
    total = (weights * rows).sum()
    want = total if reduction == "sum" else total / weights.sum()
    got = jaxce.softmax_divergence(
        zs, zt, kind="jsd", beta=0.4, temperature=1.5, sample_weights=weights, base=2,
        reduction=reduction,
    )
    np.testing.assert_allclose(got, want / np.log(2), rtol=1e-5)
    empty = jnp.zeros((0, 5))
    assert jaxce.softmax_divergence(empty, empty, reduction=reduction) == 0.0


def test_class_axis_not_last_and_several_class_axes():
    zs, zt = random_logits((3, 4, 5), seed=8)
    got = jaxce.softmax_divergence(zs, zt, axis=(0, 2), kind="reverse_kl")
    flat = lambda z: np.moveaxis(z, 1, 0).reshape(4, 15)
    want = np_divergence(flat(zs).astype(np.float64), flat(zt).astype(np.float64), "reverse_kl")
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "kl"}, "kind must be one of"),
        ({"beta": 0.0}, r"beta must be in \(0, 1\), got 0.0"),
        ({"beta": 1.0}, r"beta must be in \(0, 1\), got 1.0"),
        ({"temperature": 0.0}, "temperature must be positive and finite, got 0.0"),
        ({"temperature": float("inf")}, "temperature must be positive and finite, got inf"),
        ({"reduction": "avg"}, "reduction"),
    ],
)
def test_bad_options_raise(options, message):
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=message):
        jaxce.softmax_divergence(z, z, **options)


def test_bad_shapes_and_dtypes_raise():
    with pytest.raises(ValueError, match=r"teacher_logits shape \(2, 4\).*\(2, 3\)"):
        jaxce.softmax_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
    with pytest.raises(TypeError, match="teacher_logits"):
        jaxce.softmax_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(TypeError, match="student_logits"):
        jaxce.softmax_divergence(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))


def test_checked_mode_reports_nan_logits():
    z = jnp.zeros((2, 3))
    with pytest.raises(jaxce.CheckError, match=r"teacher_logits\[1, 2\] is nan"):
        jaxce.checked(jaxce.softmax_divergence)(z, z.at[1, 2].set(jnp.nan))


# ----------------------------------------------------------------------------------------------
# Sharded: vocabulary-parallel student and teacher on simulated devices.

DATA, MODEL = "data", "model"


@functools.cache
def sharded_problem():
    zs, zt = random_logits((8, 16), seed=9)
    zs[0, 12:] = -np.inf  # the last model shard holds only impossible classes for row 0
    zt[0, 12:] = -np.inf
    where = np.ones((8, 16), bool)
    where[1, :8] = False
    weights = np.linspace(0.5, 2.0, 8).astype(np.float32)
    return zs, zt, where, weights


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8), (8, 1)])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_sharded_equals_one_device(mesh_shape, kind, reduction):
    zs, zt, where, weights = sharded_problem()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), (DATA, MODEL))
    options = {"kind": kind, "temperature": 1.3, "reduction": reduction}

    def one_device(a, b):
        return jaxce.softmax_divergence(a, b, where=where, sample_weights=weights, **options)

    def local(a, b, where, weights):
        return jaxce.softmax_divergence(
            a, b, where=where, sample_weights=weights, class_axis_name=MODEL,
            batch_axis_name=DATA, **options,
        )

    sharded_fn = jax.shard_map(
        local, mesh=mesh, in_specs=(P(DATA, MODEL), P(DATA, MODEL), P(DATA, MODEL), P(DATA)),
        out_specs=P(DATA) if reduction == "none" else P(),
    )
    sharded = lambda a, b: sharded_fn(a, b, where, weights)
    cot = np.linspace(-1.0, 1.0, 8) if reduction == "none" else 1.0
    for f in (one_device, sharded):
        np.testing.assert_allclose(f(zs, zt), one_device(zs, zt), rtol=1e-6, atol=1e-7)
    want = jax.grad(lambda a, b: jnp.sum(cot * one_device(a, b)), argnums=(0, 1))(zs, zt)
    got = jax.jit(jax.grad(lambda a, b: jnp.sum(cot * sharded(a, b)), argnums=(0, 1)))(zs, zt)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rows = np_divergence(zs.astype(np.float64), zt.astype(np.float64), kind, tau=1.3, mask=where)
    want_value = rows * weights if reduction == "none" else (rows * weights).sum() / weights.sum()
    np.testing.assert_allclose(sharded(zs, zt), want_value, rtol=1e-5)


def test_sharded_without_vma_checks_raises():
    zs, zt, *_ = sharded_problem()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), (DATA, MODEL))
    f = jax.shard_map(
        lambda a, b: jaxce.softmax_divergence(a, b, class_axis_name=MODEL),
        mesh=mesh, in_specs=(P(DATA, MODEL), P(DATA, MODEL)), out_specs=P(DATA), check_vma=False,
    )
    with pytest.raises(ValueError, match="does not vary over mesh axis 'model'"):
        f(zs, zt)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("forms", ["cpu", "plain"])
def test_rows_longer_than_a_chunk(kind, forms, monkeypatch):
    """98304 classes (maxima and sums in chunks of 32768 on XLA:CPU, see
    jaxce._row_sums.reduce_rows), -inf logits in every chunk: values and the student's
    gradient against float64."""
    from jaxce import _row_sums

    monkeypatch.setattr(_row_sums, "CPU_FORMS", forms == "cpu")
    rng = np.random.default_rng(7)
    zs, zt = (rng.normal(size=(3, 98304)) * 3 for _ in range(2))
    impossible = rng.random(zs.shape) < 0.01
    zs[impossible], zt[impossible] = -np.inf, -np.inf  # impossible for both: no part
    zs[0, :32768] += 400.0  # row 0 peaks in its first chunk: a shift from another overflows
    zs, zt = zs.astype(np.float32), zt.astype(np.float32)
    f64 = lambda a: np.asarray(a, np.float64)
    want = np_divergence(f64(zs), f64(zt), kind, tau=2.0)
    # (fresh functions: jit traces under this test's forms)
    loss = lambda a: jaxce.softmax_divergence(a, jnp.asarray(zt), kind=kind, temperature=2.0)
    np.testing.assert_allclose(jax.jit(loss)(jnp.asarray(zs)), want, rtol=2e-5, atol=1e-6)
    if kind == "forward_kl":
        grad = jax.jit(jax.grad(lambda a: loss(a).sum()))(jnp.asarray(zs))
        ps, pt = (np.exp(np_log_softmax(f64(a), None, 2.0)) for a in (zs, zt))
        np.testing.assert_allclose(f64(grad), (ps - pt) / 2.0, atol=1e-7)
