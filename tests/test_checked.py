"""Checked mode: jaxce.checked and the value-check hooks in jaxce._checked.

The hooks are exercised directly through small local functions (so these tests do not depend
on where the library calls them), then through the public functions that call them.
References are NumPy float64.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxce
from jaxce import _checked, _value_checks
from jaxce._checked import CheckError, checked
from jaxce._value_checks import (
    check_distribution,
    check_finite,
    check_labels,
    check_unit_interval,
)


def _lse_np(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]


def int_loss(logits, labels, ignore_index=None):
    """A stand-in for a jaxce loss: integer-label cross-entropy with the labels hook."""
    check_finite("logits", logits)
    check_labels(labels, logits.shape[-1], ignore_index=ignore_index)
    hit = jnp.arange(logits.shape[-1]) == labels[..., None]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def soft_loss(logits, labels, axis=-1, where=None):
    check_distribution("labels", labels, axis, where=where)
    return -jnp.sum(labels * jax.nn.log_softmax(logits, axis=axis), axis=axis)


def raises(message):
    return pytest.raises(CheckError, match="^" + re.escape("jaxce.checked: " + message) + "$")


LOGITS = np.array(
    [[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 3.0, 1.0, -2.0], [1.0, 2.0, 3.0, 4.0, 5.0],
     [-1.0, 0.0, 1.0, 0.0, -1.0]],
    np.float32,
)


def _int_loss_np(labels):
    z = LOGITS.astype(np.float64)
    return _lse_np(z) - z[np.arange(len(labels)), labels]


# ----------------------------------------------------------------------------------------------
# Integer labels


@pytest.mark.parametrize("jit", [False, True])
def test_label_out_of_range_names_index_and_value(jit):
    f = jax.jit(int_loss) if jit else int_loss
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):
        checked(f)(LOGITS, jnp.array([0, 1, 2, 7]))
    with raises("labels[1] = -1 is outside [0, 5) (ignore_index=None)"):
        checked(f)(LOGITS, jnp.array([0, -1, 2, 7]))  # the first offender, not the largest
    with raises("labels[0] = 5 is outside [0, 5) (ignore_index=None)"):
        checked(f)(LOGITS, jnp.array([5, 0, 0, 0]))  # K itself is out


def test_label_index_is_multidimensional():
    labels = jnp.array([[0, 1, 2], [3, 4, 9]])
    with raises("labels[1, 2] = 9 is outside [0, 5) (ignore_index=None)"):
        checked(int_loss)(jnp.zeros((2, 3, 5)), labels)


def test_ignore_index_is_not_an_error_but_other_negatives_are():
    f = checked(lambda z, y: int_loss(z, y, ignore_index=-100))
    labels = jnp.array([0, -100, 4, 1])
    out = f(LOGITS, labels)
    ref = _int_loss_np(np.array([0, 0, 4, 1]))
    np.testing.assert_allclose(np.asarray(out)[[0, 2, 3]], ref[[0, 2, 3]], rtol=1e-6)
    with raises("labels[2] = -1 is outside [0, 5) (ignore_index=-100)"):
        f(LOGITS, jnp.array([0, -100, -1, 1]))


@pytest.mark.parametrize("jit", [False, True])
def test_valid_inputs_give_the_unchecked_value(jit):
    f = jax.jit(int_loss) if jit else int_loss
    labels = np.array([0, 2, 4, 1])
    out = checked(f)(LOGITS, jnp.asarray(labels))
    np.testing.assert_allclose(out, _int_loss_np(labels), rtol=1e-6)
    np.testing.assert_array_equal(out, f(LOGITS, jnp.asarray(labels)))


INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def _boundary_labels(dtype, k):
    """Every label value of ``dtype`` at a boundary: 0, K - 1, K, -1, -100, 255, the extremes."""
    info = np.iinfo(dtype)
    values = [0, 1, k - 1, k, k + 1, -1, -100, 255, 256, info.min, info.max]
    return list(dict.fromkeys(v for v in values if info.min <= v <= info.max))


@pytest.mark.parametrize("ignore_index", [None, -100, 255])
@pytest.mark.parametrize("k", [5, 200, 256, 2**16])
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_labels_of_every_integer_dtype_compare_exactly(dtype, k, ignore_index):
    """K and ignore_index are compared as Python ints: uint8 labels with K = 256 are all valid,
    int8 labels with K = 200 are valid from 0 to 127, -100 matches no uint8 label (no wrap)."""

    def f(y):
        check_labels(y, k, ignore_index=ignore_index)
        return y

    values = _boundary_labels(dtype, k)
    bad = [not 0 <= v < k and v != ignore_index for v in values]  # exact, in Python
    with jax.enable_x64(True):  # int64 and uint64 labels stay 64-bit
        y = np.array(values, dtype)
        mask = _value_checks._labels_out_of_range(jnp.asarray(y), k, ignore_index)
        np.testing.assert_array_equal(mask, bad, err_msg=f"{values}")
        if not any(bad):
            np.testing.assert_array_equal(checked(f)(y), y)
        else:
            i = bad.index(True)
            with raises(f"labels[{i}] = {values[i]} is outside [0, {k}) "
                        f"(ignore_index={ignore_index!r})"):
                checked(f)(y)


# ----------------------------------------------------------------------------------------------
# NaN and infinities


def test_nan_and_posinf_logits_are_named():
    z = LOGITS.copy()
    z[0, 2] = np.nan
    with raises("logits[0, 2] is nan (NaN and +inf are not allowed)"):
        checked(int_loss)(z, jnp.array([0, 1, 2, 3]))
    z = LOGITS.copy()
    z[2, 1] = np.inf
    with raises("logits[2, 1] is inf (NaN and +inf are not allowed)"):
        checked(jax.jit(int_loss))(z, jnp.array([0, 1, 2, 3]))


def test_neg_inf_logit_is_allowed_unless_told():
    z = LOGITS.copy()
    z[1, 4] = -np.inf  # an impossible class
    out = checked(int_loss)(z, jnp.array([0, 1, 2, 3]))
    assert np.isfinite(np.asarray(out)).all()

    def strict(x):
        check_finite("x", x, allow_neg_inf=False)
        return x

    with raises("x[1, 4] is -inf (NaN and +-inf are not allowed)"):
        checked(strict)(z)


def test_masked_nan_is_not_an_error():
    def f(x, where):
        check_finite("logits", x, where=where)
        return jnp.sum(jnp.where(where, x, 0.0))

    x = jnp.array([[1.0, jnp.nan], [2.0, 3.0]])
    assert float(checked(f)(x, jnp.array([[True, False], [True, True]]))) == 6.0
    with raises("logits[0, 1] is nan (NaN and +inf are not allowed)"):
        checked(f)(x, jnp.array([True, True]))  # a class mask, broadcast


# ----------------------------------------------------------------------------------------------
# Distributions


def test_negative_probability_is_named():
    y = np.array([[0.5, 0.5, 0.0], [0.6, 0.5, -0.1]], np.float32)
    with raises("labels[1, 2] = -0.1 is negative"):
        checked(soft_loss)(np.zeros((2, 3), np.float32), y)


def test_sum_not_one_is_named():
    y = np.array([[0.5, 0.5, 0.0], [0.5, 0.25, 0.0], [0.2, 0.2, 0.2]], np.float32)
    with raises("labels[1, :] sums to 0.75, not 1 (tolerance 0.001)"):
        checked(jax.jit(soft_loss))(np.zeros((3, 3), np.float32), y)


def test_sum_along_another_axis_names_the_column():
    y = np.array([[0.5, 0.5], [0.5, 0.25]], np.float32)  # column 1 sums to 0.75
    with raises("labels[:, 1] sums to 0.75, not 1 (tolerance 0.001)"):
        checked(lambda z, y: soft_loss(z, y, axis=0))(np.zeros((2, 2), np.float32), y)


def test_nan_probability_is_named_before_its_sum():
    y = np.array([[0.5, 0.5], [np.nan, 1.0]], np.float32)
    with raises("labels[1, 0] is nan (not a probability)"):
        checked(soft_loss)(np.zeros((2, 2), np.float32), y)


def test_tolerance():
    y = np.array([[0.5, 0.4995], [0.5, 0.495]], np.float32)  # off by 5e-4 and 5e-3
    with raises("labels[1, :] sums to 0.995, not 1 (tolerance 0.001)"):
        checked(soft_loss)(np.zeros((2, 2), np.float32), y)
    out = checked(soft_loss, tolerance=0.01)(np.zeros((2, 2), np.float32), y)
    np.testing.assert_allclose(out, np.log(2.0) * y.astype(np.float64).sum(-1), rtol=1e-6)
    with raises("labels[0, :] sums to 0.9995, not 1 (tolerance 0)"):
        checked(soft_loss, tolerance=0)(np.zeros((2, 2), np.float32), y)
    with pytest.raises(ValueError, match="tolerance must be finite and >= 0, got -1"):
        checked(soft_loss, tolerance=-1)
    with pytest.raises(TypeError, match="tolerance must be a Python number or None"):
        checked(soft_loss, tolerance="1e-3")


def test_bfloat16_thirds_pass_with_the_default_tolerance():
    y = jnp.full((2, 3), 1 / 3, jnp.bfloat16)  # each rounds to 0.333984375: the sum is 1.00195
    assert abs(float(jnp.sum(y[0].astype(jnp.float32))) - 1.0) > 1e-3
    checked(soft_loss)(jnp.zeros((2, 3)), y)
    assert _value_checks.default_tolerance(jnp.float32) == 1e-3
    assert _value_checks.default_tolerance(jnp.bfloat16) == 4 * 2.0**-7


def test_masked_classes_and_fully_masked_rows_are_exempt():
    y = np.array([[0.5, 0.5, -3.0], [-1.0, 7.0, 2.0]], np.float32)
    where = np.array([[True, True, False], [False, False, False]])
    out = checked(soft_loss)(np.zeros((2, 3), np.float32), y, where=where)
    assert out.shape == (2,)
    with raises("labels[0, 2] = -3 is negative"):
        checked(soft_loss)(np.zeros((2, 3), np.float32), y, where=np.array([True, True]))


_TAKING_NO_PART = {  # masks that leave example 1 of 2 (3 classes) out of the loss
    "example": np.array([True, False]),
    "example [N, 1]": np.array([[True], [False]]),
    "all its classes": np.array([[True, True, False], [False, False, False]]),
}


@pytest.mark.parametrize("mask", list(_TAKING_NO_PART))
@pytest.mark.parametrize("fn", ["integer", "sparse", "nll", "label_log_probs"])
def test_labels_of_examples_left_out_are_not_checked(fn, mask):
    """An example that a mask leaves out takes no part in the loss, whatever its label (as
    its soft label, its NaN logits): checked mode does not raise on it. The same label in an
    example that takes part still raises."""
    where = _TAKING_NO_PART[mask]
    z = np.zeros((2, 3), np.float32)
    call = {
        "integer": lambda y, w: jaxce.softmax_cross_entropy_with_integer_labels(z, y, where=w),
        "sparse": lambda y, w: jaxce.softmax_cross_entropy_with_sparse_labels(
            z, y[:, None], np.ones((2, 1), np.float32), where=w
        ),
        "nll": lambda y, w: jaxce.nll_loss(  # a distribution over row 0's unmasked classes
            np.log(np.array([[0.5, 0.5, 0.5], [1 / 3] * 3], np.float32)), y, where=w
        ),
        "label_log_probs": lambda y, w: jaxce.label_log_probs(z, y, where=w),
    }[fn]
    if fn == "nll" and mask != "all its classes":
        pytest.skip("nll_loss takes log-probabilities: its where masks classes, of their shape")
    out = np.asarray(checked(call)(np.array([0, 7]), where))
    expected = np.log(2 if mask == "all its classes" else 3)  # (row 0 then holds 2 classes)
    expected = -expected if fn == "label_log_probs" else expected
    np.testing.assert_allclose(out, [expected, 0.0], rtol=1e-6)
    name = "label_indices[0, 0]" if fn == "sparse" else "labels[0]"
    with pytest.raises(CheckError, match=re.escape(name) + " = 7 is outside"):
        checked(call)(np.array([7, 0]), where)


@pytest.mark.parametrize("fn", ["integer", "sparse", "label_log_probs"])
def test_fused_labels_with_every_class_masked_are_not_checked(fn):
    """The fused losses take a class mask: with every class masked no example takes part, and
    no label is checked; with one class left every label is."""
    x = np.ones((2, 2), np.float32)
    w = np.ones((2, 3), np.float32)

    def call(y, where):
        if fn == "label_log_probs":
            return jaxce.linear_label_log_probs(x, w, y, where=where)
        if fn == "sparse":
            return jaxce.linear_softmax_cross_entropy(
                x, w, y[:, None], label_weights=np.ones((2, 1), np.float32), where=where,
                reduction="none",
            )
        return jaxce.linear_softmax_cross_entropy(x, w, y, where=where, reduction="none")

    np.testing.assert_array_equal(checked(call)(np.array([0, 7]), np.zeros(3, bool)), 0.0)
    with pytest.raises(CheckError, match=" = 7 is outside"):
        checked(call)(np.array([0, 7]), np.array([True, False, False]))


def test_log_distribution():
    def nll(log_p):
        check_distribution("log_probs", log_p, -1, log=True)
        return -log_p[..., 0]

    good = np.array([[np.log(0.25), np.log(0.75)], [0.0, -np.inf]])  # log 0 = -inf is allowed
    np.testing.assert_allclose(checked(nll)(good), -good[:, 0])
    with raises("log_probs[1, :] exp-sums to 2, not 1 (tolerance 0.001)"):
        checked(nll)(np.array([[np.log(0.5), np.log(0.5)], [0.0, 0.0]]))
    with raises("log_probs[0, 1] is inf (not a log-probability)"):
        checked(nll)(np.array([[0.0, np.inf]]))


def test_unit_interval():
    def bce(p):
        check_unit_interval("labels", p)
        return p

    checked(bce)(jnp.array([0.0, 0.5, 1.0]))
    with raises("labels[2] = 1.5 is outside [0, 1]"):
        checked(bce)(jnp.array([0.0, 1.0, 1.5, -1.0]))
    with raises("labels[1] = nan is outside [0, 1]"):
        checked(bce)(jnp.array([0.0, jnp.nan]))


# ----------------------------------------------------------------------------------------------
# The wrapper: caching, transforms, arguments


def test_no_checks_without_the_wrapper():
    z, y = jnp.asarray(LOGITS), jnp.array([0, 1, 2, 7])
    assert "check" not in str(jax.make_jaxpr(int_loss)(z, y))
    # and the same trace inside checked mode does hold checks: the assertion above can fail.
    with _checked._active(_checked._Settings(None)):
        assert "check" in str(jax.make_jaxpr(int_loss)(z, y))
    assert not _checked.is_active()
    out = int_loss(z, y)  # unchecked: out of range gives whatever the formula gives, no error
    assert out.shape == (4,)


def test_jitted_function_called_before_wrapping_is_still_checked():
    f = jax.jit(int_loss)
    bad = jnp.array([0, 1, 2, 7])
    unchecked = f(LOGITS, bad)  # traced and cached without checks
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):
        checked(f)(LOGITS, bad)
    # and afterwards the plain call still runs its unchecked version, without raising
    np.testing.assert_array_equal(f(LOGITS, bad), unchecked)


def test_nested_jitted_helper_called_before_is_still_checked():
    inner = jax.jit(int_loss)
    inner(LOGITS, jnp.array([0, 1, 2, 7]))

    @jax.jit
    def outer(z, y):
        return jnp.mean(inner(z, y))

    outer(LOGITS, jnp.array([0, 1, 2, 7]))
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):
        checked(outer)(LOGITS, jnp.array([0, 1, 2, 7]))


def test_fallback_without_jit_key_state_unwraps_a_jitted_fn(monkeypatch):
    f = jax.jit(int_loss)
    f(LOGITS, jnp.array([0, 1, 2, 7]))
    monkeypatch.setattr(_checked, "_STATE", None)
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):
        checked(f)(LOGITS, jnp.array([0, 1, 2, 7]))
    np.testing.assert_allclose(
        checked(f)(LOGITS, jnp.array([0, 2, 4, 1])), _int_loss_np([0, 2, 4, 1]), rtol=1e-6
    )
    assert not _checked.is_active()


def test_grad_and_vmap_inside():
    labels = np.array([0, 2, 4, 1])
    mean_loss = lambda z, y: jnp.mean(int_loss(z, y))
    g = checked(jax.grad(mean_loss))(LOGITS, jnp.asarray(labels))
    z = LOGITS.astype(np.float64)
    p = np.exp(z - _lse_np(z)[:, None])
    np.testing.assert_allclose(g, (p - np.eye(5)[labels]) / 4, atol=1e-6)
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):
        checked(jax.jit(jax.grad(mean_loss)))(LOGITS, jnp.array([0, 1, 2, 7]))
    # under vmap the index is within one example (row 2's labels[0])
    per_row = jax.vmap(int_loss)
    with raises("labels[0] = 5 is outside [0, 5) (ignore_index=None)"):
        checked(per_row)(jnp.zeros((3, 1, 5)), jnp.array([[0], [1], [5]]))


def test_python_options_pass_through():
    def f(z, y, reduction, scale=1.0):
        loss = int_loss(z, y) * scale
        return {"mean": jnp.mean, "sum": jnp.sum}[reduction](loss)

    labels = np.array([0, 2, 4, 1])
    out = checked(f)(LOGITS, jnp.asarray(labels), "sum", scale=2.0)
    np.testing.assert_allclose(out, 2.0 * _int_loss_np(labels).sum(), rtol=1e-6)
    g = jax.jit(f, static_argnums=2)
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):
        checked(g)(LOGITS, jnp.array([0, 1, 2, 7]), "mean")


def test_under_a_transform_is_a_clear_error():
    with pytest.raises(TypeError, match=r"put the transforms inside: jaxce.checked\(jax.jit"):
        jax.jit(checked(int_loss))(LOGITS, jnp.array([0, 1, 2, 3]))


def test_check_error_is_a_value_error():
    assert issubclass(CheckError, ValueError)
    with pytest.raises(ValueError):
        checked(int_loss)(LOGITS, jnp.array([9, 0, 0, 0]))


def test_class_axis_name_checks_the_global_range():
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("c",))

    def local(z, y):  # z holds 3 of the 6 classes on each device
        check_labels(y, z.shape[-1], class_axis_name="c")
        return jax.lax.psum(jnp.sum(z, axis=-1), "c")

    f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "c"), P()), out_specs=P()))
    z = jnp.zeros((2, 6))
    checked(f)(z, jnp.array([5, 0]))  # 5 < 6 = 3 * 2: valid, though >= 3 locally
    with raises("labels[0] = 6 is outside [0, 6) (ignore_index=None) (in mapped instance 0)"):
        checked(f)(z, jnp.array([6, 0]))


# ----------------------------------------------------------------------------------------------
# Through the public functions (they call the hooks)


LABELS = np.array([0, 2, 4, 1])


def test_public_exports():
    assert jaxce.checked is checked and jaxce.CheckError is CheckError


@pytest.mark.parametrize("jit", [False, True])
def test_integer_label_loss(jit):
    loss = jaxce.softmax_cross_entropy_with_integer_labels
    f = jax.jit(loss, static_argnames="reduction") if jit else loss
    out = checked(f)(LOGITS, jnp.asarray(LABELS), reduction="mean")
    np.testing.assert_allclose(out, _int_loss_np(LABELS).mean(), rtol=1e-6)
    np.testing.assert_array_equal(out, f(LOGITS, jnp.asarray(LABELS), reduction="mean"))
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):
        checked(f)(LOGITS, jnp.array([0, 1, 2, 7]), reduction="mean")
    z = LOGITS.copy()
    z[0, 2] = np.nan
    with raises("logits[0, 2] is nan (NaN and +inf are not allowed)"):
        checked(f)(z, jnp.asarray(LABELS), reduction="mean")


def test_integer_label_loss_ignore_index_and_mask():
    f = checked(
        lambda z, y, where: jaxce.softmax_cross_entropy_with_integer_labels(
            z, y, where=where, ignore_index=-100
        )
    )
    z = LOGITS.copy()
    z[1, 4] = np.nan  # masked: not an error
    where = np.ones((4, 5), bool)
    where[1, 4] = False
    out = f(z, jnp.array([0, -100, 4, 1]), where)
    assert float(out[1]) == 0.0
    kept = [0, 2, 3]
    np.testing.assert_allclose(np.asarray(out)[kept], _int_loss_np(LABELS)[kept], rtol=1e-6)
    with raises("labels[2] = 5 is outside [0, 5) (ignore_index=-100)"):
        f(z, jnp.array([0, -100, 5, 1]), where)


def test_jitted_public_loss_called_before_wrapping():
    step = jax.jit(jax.value_and_grad(
        lambda z, y: jaxce.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean")))
    bad = jnp.array([0, 1, 2, 7])
    step(LOGITS, bad)
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):
        checked(step)(LOGITS, bad)
    value, grad = checked(step)(LOGITS, jnp.asarray(LABELS))
    z = LOGITS.astype(np.float64)
    p = np.exp(z - _lse_np(z)[:, None])
    np.testing.assert_allclose(value, _int_loss_np(LABELS).mean(), rtol=1e-6)
    np.testing.assert_allclose(grad, (p - np.eye(5)[LABELS]) / 4, atol=1e-6)


def test_public_losses_emit_no_checks_without_the_wrapper():
    z, y = jnp.asarray(LOGITS), jnp.asarray(LABELS)
    soft = jnp.full((4, 5), 0.2)
    for jaxpr in (
        jax.make_jaxpr(jaxce.softmax_cross_entropy_with_integer_labels)(z, y),
        jax.make_jaxpr(jaxce.softmax_cross_entropy)(z, soft),
        jax.make_jaxpr(jaxce.nll_loss)(z, y),
        jax.make_jaxpr(jaxce.entropy)(soft),
        jax.make_jaxpr(jaxce.kl_divergence)(soft, soft),
        jax.make_jaxpr(jaxce.linear_softmax_cross_entropy)(jnp.eye(4), z, y),
    ):
        assert "check" not in str(jaxpr)
    with _checked._active(_checked._Settings(None)):  # the assertion above can fail
        assert "check" in str(jax.make_jaxpr(jaxce.softmax_cross_entropy_with_integer_labels)(z, y))


def test_soft_label_loss():
    y = np.full((4, 5), 0.2, np.float32)
    f = checked(jax.jit(jaxce.softmax_cross_entropy))
    z = LOGITS.astype(np.float64)
    ref = -(y * (z - _lse_np(z)[:, None])).sum(-1)
    np.testing.assert_allclose(f(LOGITS, y), ref, rtol=1e-6)
    y[2] = [0.2, 0.2, 0.2, 0.2, 0.1]
    with raises("labels[2, :] sums to 0.9, not 1 (tolerance 0.001)"):
        f(LOGITS, y)
    # class axis 0: the message names the column
    with raises("labels[:, 2] sums to 0.9, not 1 (tolerance 0.001)"):
        checked(jaxce.softmax_cross_entropy)(LOGITS.T, y.T, axis=0)
    y[2] = [0.5, 0.5, 0.2, -0.2, 0.0]
    with raises("labels[2, 3] = -0.2 is negative"):
        f(LOGITS, y)


def test_nll_loss():
    log_p = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    out = checked(jaxce.nll_loss)(log_p, jnp.array([1, 0]))
    np.testing.assert_allclose(out, [-np.log(0.75), np.log(2.0)], rtol=1e-6)
    with raises("labels[1] = 2 is outside [0, 2) (ignore_index=None)"):
        checked(jaxce.nll_loss)(log_p, jnp.array([1, 2]))
    with raises("log_probs[0, :] exp-sums to 2, not 1 (tolerance 0.001)"):
        checked(jaxce.nll_loss)(np.zeros((2, 2)) + [[0.0], [np.log(0.5)]], jnp.array([1, 0]))


def test_sigmoid_binary_cross_entropy():
    f = checked(jaxce.sigmoid_binary_cross_entropy)
    z = np.array([0.5, -1.0, 2.0], np.float32)
    y = np.array([1.0, 0.0, 0.5], np.float32)
    z64 = z.astype(np.float64)
    ref = np.logaddexp(0, -z64) * y + np.logaddexp(0, z64) * (1 - y)
    np.testing.assert_allclose(f(z, y), ref, rtol=1e-6)
    with raises("labels[1] = -0.5 is outside [0, 1]"):
        f(z, np.array([1.0, -0.5, 2.0], np.float32))


def test_information_measures():
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    q = np.array([[0.5, 0.25, 0.25], [0.5, 0.4, 0.2]])
    with raises("q[1, :] sums to 1.1, not 1 (tolerance 0.001)"):
        checked(jaxce.kl_divergence)(p, q)
    with raises("q[1, :] sums to 1.1, not 1 (tolerance 0.001)"):
        checked(jaxce.cross_entropy)(p, q)
    with raises("p[0, 1] = -0.2 is negative"):
        checked(jaxce.entropy)(p * [[1, -1, 1]])
    h = checked(jaxce.entropy)(p)
    np.testing.assert_allclose(h, [0.80181855, np.log(2.0)], rtol=1e-6)  # REFERENCE.md
    with raises("logits[0, 1] is nan (NaN and +inf are not allowed)"):
        checked(jaxce.softmax_entropy)(np.array([[0.0, np.nan]]))


def test_entropy_of_bfloat16_thirds_passes():
    checked(jaxce.entropy)(jnp.full((3,), 1 / 3, jnp.bfloat16))


# ----------------------------------------------------------------------------------------------
# Gradient accumulation: the loss inside a loop, differentiated


def _micro_batch_loss(z, y):
    return jaxce.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean")


def accumulate_scan(z, labels):
    """The summed loss of the micro-batches ``z[i]``, one per ``lax.scan`` step."""
    step = lambda total, zy: (total + _micro_batch_loss(*zy), None)
    return lax.scan(step, 0.0, (z, labels))[0]


def accumulate_fori(z, labels):
    """The same sum in a ``lax.fori_loop``."""
    body = lambda i, total: total + _micro_batch_loss(z[i], labels[i])
    return lax.fori_loop(0, z.shape[0], body, 0.0)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("loop", [accumulate_scan, accumulate_fori], ids=["scan", "fori_loop"])
def test_gradient_accumulation_in_a_loop_is_checked(loop, jit):
    """Reverse-mode AD of a loop partially evaluates its body, which dropped every check."""
    g = jax.jit(jax.grad(loop)) if jit else jax.grad(loop)
    z, labels = jnp.stack([LOGITS] * 3), jnp.stack([LABELS] * 3)  # three micro-batches
    z64 = LOGITS.astype(np.float64)
    p = np.exp(z64 - _lse_np(z64)[:, None])
    np.testing.assert_allclose(checked(g)(z, labels), [(p - np.eye(5)[LABELS]) / 4] * 3, atol=1e-6)
    with raises("labels[3] = 7 is outside [0, 5) (ignore_index=None)"):  # within the step
        checked(g)(z, labels.at[1, 3].set(7))
    with raises("logits[0, 2] is nan (NaN and +inf are not allowed)"):
        checked(g)(z.at[2, 0, 2].set(jnp.nan), labels)
    if _checked._KEPT is not None:  # outside the wrapper JAX's registry is as it was
        kept, effect_type = _checked._KEPT
        assert effect_type not in kept._effect_types and _checked._tracing == 0


# ----------------------------------------------------------------------------------------------
# linear_softmax_cross_entropy, and sharded inputs (global indices)


X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
W = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]], np.float32)


def linear_none(x, w, labels, **kw):
    return jaxce.linear_softmax_cross_entropy(x, w, labels, reduction="none", **kw)


def test_linear_loss_checks_labels():
    labels = np.array([0, 1, 2])
    z = X.astype(np.float64) @ W
    ref = _lse_np(z) - z[np.arange(3), labels]
    np.testing.assert_allclose(checked(linear_none)(X, W, labels), ref, rtol=1e-6)
    with raises("labels[1] = 3 is outside [0, 3) (ignore_index=None)"):
        checked(linear_none)(X, W, np.array([0, 3, 2]))
    with raises("labels[2] = -1 is outside [0, 3) (ignore_index=-100)"):
        checked(linear_none)(X, W, np.array([0, -100, -1]), ignore_index=-100)
    out = checked(linear_none)(X, W, np.array([0, -100, 2]), ignore_index=-100)
    np.testing.assert_allclose(out, [ref[0], 0.0, ref[2]], rtol=1e-6)
    with raises("labels[1, 0] = 5 is outside [0, 3) (ignore_index=None)"):  # x [2, 2, D]
        checked(linear_none)(np.stack([X[:2]] * 2), W, np.array([[0, 1], [5, 2]]))
    mean_loss = lambda w: jaxce.linear_softmax_cross_entropy(X, w, np.array([0, 1, 3]))
    with raises("labels[2] = 3 is outside [0, 3) (ignore_index=None)"):
        checked(jax.jit(jax.grad(mean_loss)))(W)


def test_linear_loss_checks_x_w_and_bias():
    labels = np.array([0, 1, 2])
    x = X.copy()
    x[2, 1] = np.nan
    with raises("x[2, 1] is nan (NaN and +-inf are not allowed)"):
        checked(linear_none)(x, W, labels)
    w = W.copy()
    w[0, 2] = -np.inf  # an infinite weight is no impossible class: -inf * 0 is NaN
    with raises("w[0, 2] is -inf (NaN and +-inf are not allowed)"):
        checked(linear_none)(X, w, labels)
    with raises("bias[1] is inf (NaN and +inf are not allowed)"):
        checked(linear_none)(X, W, labels, bias=np.array([0.0, np.inf, 0.0], np.float32))
    bias = np.array([0.0, 0.0, -np.inf], np.float32)  # class 2 impossible: valid
    out = checked(linear_none)(X, W, np.array([0, 1, 1]), bias=bias)
    assert np.isfinite(np.asarray(out)).all()


DATA, MODEL = "data", "model"
N, D, V = 8, 3, 16  # on the 2 x 4 mesh: 4 rows and 4 classes a device


def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), (DATA, MODEL))


def sharded_linear(x, w, labels):
    loss = lambda x, w, y: jaxce.linear_softmax_cross_entropy(
        x, w, y, reduction="sum", class_axis_name=MODEL, batch_axis_name=DATA
    )
    specs = (P(DATA), P(None, MODEL), P(DATA))
    return jax.shard_map(loss, mesh=mesh(), in_specs=specs, out_specs=P())(x, w, labels)


def test_sharded_linear_loss_names_the_global_index(rng):
    """Row 5 lives on data shard 1 (local row 1), column 9 on model shard 2 (local column 1);
    the mapped instance is the device's flat index in the 2 x 4 mesh."""
    x = rng.standard_normal((N, D)).astype(np.float32)
    w = rng.standard_normal((D, V)).astype(np.float32)
    labels = np.arange(N) * 2
    f = checked(jax.jit(sharded_linear))
    single = jaxce.linear_softmax_cross_entropy(x, w, labels, reduction="sum")
    np.testing.assert_allclose(f(x, w, labels), single, rtol=1e-5)
    bad = labels.copy()
    bad[5] = V
    with raises(f"labels[5] = {V} is outside [0, {V}) (ignore_index=None) (in mapped instance 4)"):
        f(x, w, bad)
    x[6, 1] = np.nan
    with raises("x[6, 1] is nan (NaN and +-inf are not allowed) (in mapped instance 4)"):
        f(x, w, labels)
    x[6, 1] = 0.0
    w[2, 9] = np.inf
    with raises("w[2, 9] is inf (NaN and +-inf are not allowed) (in mapped instance 2)"):
        f(x, w, labels)


def test_sharded_integer_label_loss_names_the_global_index():
    def loss(z, y):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z, y, reduction="sum", class_axis_name=MODEL, batch_axis_name=DATA
        )

    f = jax.jit(jax.shard_map(loss, mesh=mesh(), in_specs=(P(DATA, MODEL), P(DATA)),
                              out_specs=P()))
    labels = np.arange(N) * 2
    np.testing.assert_allclose(checked(f)(np.zeros((N, V)), labels), N * np.log(V), rtol=1e-6)
    labels[6] = -1
    with raises(f"labels[6] = -1 is outside [0, {V}) (ignore_index=None) (in mapped instance 4)"):
        checked(f)(np.zeros((N, V)), labels)


def test_sharded_hooks_name_global_indices_and_sum_whole_rows():
    """check_finite and check_distribution with a class axis and a batch axis split."""

    def local(z, p):
        check_finite("logits", z, class_axis_name=MODEL, batch_axis_name=DATA)
        check_distribution("labels", p, class_axis_name=MODEL, batch_axis_name=DATA)
        return jax.lax.psum(jnp.sum(z * p), (DATA, MODEL))

    f = jax.jit(jax.shard_map(local, mesh=mesh(), in_specs=(P(DATA, MODEL),) * 2, out_specs=P()))
    z, p = np.zeros((N, V), np.float32), np.full((N, V), 1 / V, np.float32)
    assert float(checked(f)(z, p)) == 0.0  # each shard holds a quarter of every row: still 1
    z[5, 10] = np.nan
    with raises("logits[5, 10] is nan (NaN and +inf are not allowed) (in mapped instance 6)"):
        checked(f)(z, p)
    q = p.copy()
    q[5, 10], q[5, 11] = -1 / V, 3 / V  # the row still sums to 1
    with raises("labels[5, 10] = -0.0625 is negative (in mapped instance 6)"):
        checked(f)(np.zeros((N, V), np.float32), q)
    q = p.copy()
    q[6, 3] = 0.5
    with raises("labels[6, :] sums to 1.4375, not 1 (tolerance 0.001) (in mapped instance 4)"):
        checked(f)(np.zeros((N, V), np.float32), q)
