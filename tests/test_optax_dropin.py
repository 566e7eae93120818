"""jaxce.losses as a drop-in for optax.losses: optax's own tests, run against jaxce.

optax ships its tests (``optax/losses/_classification_test.py``, ``_smoothing_test.py``). Each
of their test classes for a name jaxce.losses shares is subclassed here, and for the duration
of every test the module name the tests call (``_classification`` / ``_smoothing``) is patched
to :mod:`jaxce.losses`. Nothing in the tests is copied or changed, with one adaptation:

- ``jax.test_util.check_grads`` (the test module's ``jaxtest``) runs with ``modes=["rev"]``
  in the three softmax cross-entropy classes: jaxce's losses are ``jax.custom_vjp``
  functions, which reverse mode (and forward-over-reverse) differentiates and forward mode
  alone cannot. The reverse-mode check against finite differences is unchanged.
"""

import functools
import inspect
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # optax's own imports, not jaxce's
    optax_losses = pytest.importorskip("optax.losses")
    pytest.importorskip("absl.testing.parameterized")
    classification_test = pytest.importorskip("optax.losses._classification_test")
    smoothing_test = pytest.importorskip("optax.losses._smoothing_test")

import jaxce
from jaxce import losses

NAMES = (
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "safe_softmax_cross_entropy",
    "poly_loss_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "generalized_kl_divergence",
    "convex_kl_divergence",
    "smooth_labels",
)


class _ReverseModeTestUtil:
    """Stands in for ``jax.test_util`` in optax's test module: ``check_grads`` in reverse mode."""

    check_grads = staticmethod(functools.partial(jax.test_util.check_grads, modes=["rev"]))


def _against_jaxce(base, module, name: str, reverse_mode: bool = False):
    """``base`` (an optax TestCase) with ``module.<name>`` patched to jaxce.losses in every test."""

    class Case(base):
        def setUp(self):
            self.enter_context(mock.patch.object(module, name, losses))
            if reverse_mode:
                self.enter_context(mock.patch.object(module, "jaxtest", _ReverseModeTestUtil))
            super().setUp()

        def test_runs_against_jaxce(self):
            # The substitution is in force: the tests above call jaxce, not optax.
            assert getattr(module, name) is losses

    Case.__name__ = Case.__qualname__ = f"TestOptax{base.__name__}"
    return Case


_C = classification_test
TestOptaxSoftmaxCrossEntropy = _against_jaxce(
    _C.SoftmaxCrossEntropyTest, _C, "_classification", reverse_mode=True
)
TestOptaxSafeSoftmaxCrossEntropy = _against_jaxce(
    _C.SafeSoftmaxCrossEntropyTest, _C, "_classification", reverse_mode=True
)
TestOptaxSoftmaxCrossEntropyWithIntegerLabels = _against_jaxce(
    _C.SoftmaxCrossEntropyWithIntegerLabelsTest, _C, "_classification", reverse_mode=True
)
TestOptaxSigmoidCrossEntropy = _against_jaxce(_C.SigmoidCrossEntropyTest, _C, "_classification")
TestOptaxPolyLoss = _against_jaxce(_C.PolyLossTest, _C, "_classification")
TestOptaxGeneralizedKLDivergence = _against_jaxce(
    _C.GeneralizedKLDivergenceTest, _C, "_classification"
)
TestOptaxKLDivergence = _against_jaxce(_C.KLDivergenceTest, _C, "_classification")
TestOptaxKLDivergenceWithLogTargets = _against_jaxce(
    _C.KLDivergenceWithLogTargetsTest, _C, "_classification"
)
TestOptaxSigmoidFocalLoss = _against_jaxce(_C.SigmoidFocalLossTest, _C, "_classification")
TestOptaxSmoothLabels = _against_jaxce(
    smoothing_test.SmoothLabelsTest, smoothing_test, "_smoothing"
)
del _C


def test_module_is_exposed():
    assert jaxce.losses is losses
    assert sorted(losses.__all__) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_optax(name):
    """optax's parameters, in order, of the same kinds and defaults; jaxce's only after them."""
    ours = list(inspect.signature(getattr(losses, name)).parameters.values())
    theirs = list(inspect.signature(getattr(optax_losses, name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    assert all(p.kind == p.VAR_KEYWORD for p in ours[len(theirs) :])


def test_nan_free_where_optax_gives_nan():
    z = jnp.array([[0.0, 1.0, -jnp.inf], [2.0, -jnp.inf, -jnp.inf]])
    y = jnp.array([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]])
    for name in ("softmax_cross_entropy", "poly_loss_cross_entropy"):
        assert np.isnan(getattr(optax_losses, name)(z, y)).any()
        f = lambda z, name=name: jnp.sum(getattr(losses, name)(z, y))
        ours, grad = jax.value_and_grad(f)(z)
        # The finite entries agree with optax's on the rows without -inf.
        np.testing.assert_allclose(
            getattr(losses, name)(z[:, :2], y[:, :2])[0],
            getattr(optax_losses, name)(z[:, :2], y[:, :2])[0],
            rtol=1e-6,
        )
        assert np.isfinite(ours) and np.isfinite(grad).all()
        np.testing.assert_array_equal(grad[:, 2], 0.0)
    log_q, t = jnp.log(jnp.array([0.5, 0.5, 0.0])), jnp.array([0.5, 0.5, 0.0])
    for name in ("kl_divergence", "generalized_kl_divergence"):
        assert np.isnan(getattr(optax_losses, name)(log_q, t))
        value, grad = jax.value_and_grad(getattr(losses, name), argnums=(0, 1))(log_q, t)
        assert value == pytest.approx(0.0, abs=1e-7)
        assert all(np.isfinite(g).all() for g in grad)
    assert np.isnan(optax_losses.kl_divergence_with_log_targets(log_q, log_q))
    value, grad = jax.value_and_grad(losses.kl_divergence_with_log_targets, argnums=(0, 1))(
        log_q, log_q
    )
    assert value == pytest.approx(0.0, abs=1e-7) and all(np.isfinite(g).all() for g in grad)
    zb, yb = jnp.array([jnp.inf, -jnp.inf]), jnp.array([1.0, 0.0])
    assert np.isnan(optax_losses.sigmoid_binary_cross_entropy(zb, yb)).all()
    np.testing.assert_array_equal(losses.sigmoid_binary_cross_entropy(zb, yb), 0.0)
    assert np.isnan(optax_losses.sigmoid_focal_loss(zb, yb)).all()
    np.testing.assert_array_equal(losses.sigmoid_focal_loss(zb, yb), 0.0)


@pytest.mark.parametrize("axis", [(3, 2), (-1, -2), (2, 0), (0, 3, 1)])
def test_integer_labels_axes_out_of_order_match_optax(axis):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    k = int(np.prod([z.shape[a] for a in axis]))
    batch = tuple(d for i, d in enumerate(z.shape) if i % 4 not in {a % 4 for a in axis})
    y = rng.integers(0, k, size=batch)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy_with_integer_labels(z, y, axis),
        optax_losses.softmax_cross_entropy_with_integer_labels(z, y, axis),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy_with_integer_labels(z, y, axis),
        optax_losses.softmax_cross_entropy_with_integer_labels(z, y, axis),
        rtol=1e-6,
    )


def test_extra_options_pass_through():
    z = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    y = jnp.array([0, -100])
    np.testing.assert_allclose(
        losses.softmax_cross_entropy_with_integer_labels(z, y, ignore_index=-100, reduction="mean"),
        jaxce.softmax_cross_entropy_with_integer_labels(z, jnp.array([0, 0]))[0],
        rtol=1e-6,
    )
    soft = jax.nn.one_hot(jnp.array([0, 2]), 3)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(z, soft, label_smoothing=0.1),
        optax_losses.softmax_cross_entropy(z, optax_losses.smooth_labels(soft, 0.1)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        losses.sigmoid_binary_cross_entropy(z, soft, reduction="sum"),
        jnp.sum(optax_losses.sigmoid_binary_cross_entropy(z, soft)),
        rtol=1e-6,
    )


def test_empty_class_axis_is_zero_as_in_optax():
    # optax's test_mask draws a random mask, all False one time in 32 (size 5): no classes.
    empty = jnp.zeros((0,))
    for name in ("softmax_cross_entropy", "poly_loss_cross_entropy", "kl_divergence"):
        assert getattr(losses, name)(empty, empty) == getattr(optax_losses, name)(empty, empty) == 0


# Masks of another rank than the logits (optax expands them at ``axis``), against optax's number;
# (logits shape, axis, where shape, whether optax takes it for integer labels too)
_EXPANDED_WHERE = [
    ((2, 3, 4), -1, (2, 1), True),
    ((2, 3, 4), -1, (1, 3), True),
    ((2, 3, 4), -1, (2, 3), True),
    ((2, 3, 4), -1, (3,), False),  # optax's integer loss raises; its soft one masks axis 1
    ((2, 4, 3), 1, (2, 3), True),
    ((4, 4), -1, (4,), True),  # a mask of the batch shape, also of the class shape
]


@pytest.mark.parametrize("labels", ["integer", "soft"])
@pytest.mark.parametrize("shape, axis, where_shape, integer_ok", _EXPANDED_WHERE)
def test_where_of_another_rank_is_expanded_as_in_optax(shape, axis, where_shape, integer_ok, labels):
    rng = np.random.default_rng(7)
    z = jnp.asarray(rng.normal(size=shape), jnp.float32)
    where = jnp.asarray(np.arange(np.prod(where_shape)).reshape(where_shape) % 3 != 1)
    if labels == "integer":
        if not integer_ok:
            pytest.skip("optax's integer-label loss refuses this mask")
        batch = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
        y = jnp.asarray(rng.integers(0, shape[axis], batch))
        got = losses.softmax_cross_entropy_with_integer_labels(z, y, axis, where)
        want = optax_losses.softmax_cross_entropy_with_integer_labels(z, y, axis, where)
    else:
        y = jax.nn.softmax(jnp.asarray(rng.normal(size=shape), jnp.float32), axis)
        got = losses.softmax_cross_entropy(z, y, axis, where)
        want = optax_losses.softmax_cross_entropy(z, y, axis, where)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_class_mask_optax_refuses_stays_a_class_mask():
    """A [K] mask of [N, T, K] logits does not broadcast once expanded (optax raises): jaxce
    reads it as a class mask, as its own losses do."""
    rng = np.random.default_rng(8)
    z = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, (2, 3)))
    m = jnp.array([True, True, False, True])
    got = losses.softmax_cross_entropy_with_integer_labels(z, y, -1, m)
    want = jax.nn.logsumexp(jnp.where(m, z, -jnp.inf), -1) - jnp.take_along_axis(z, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
