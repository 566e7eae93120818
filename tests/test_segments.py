"""reduction="segment_mean": the mean within each segment of a packed batch, then over segments.

Against a float64 NumPy reference written here (per-segment weighted means of the per-example
losses jaxce returns with reduction="none", which the other test files check), for the in-place
losses, the fused linear loss and the divergence, with sample and class weights, ignored and
masked examples, empty segments, and a batch split over devices (segment ids global).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxce

N, K, D, SEGMENTS = 12, 7, 5, 5  # segment 4 stays empty
IDS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3], np.int32)


def np_segment_mean(losses, counted, weights, ids, num_segments):
    """sum_s [sum_{i in s} w_i L_i / sum_{i in s} w_i] / #{s: sum w_i != 0}, counted i only."""
    means = []
    for s in range(num_segments):
        inside = (ids == s) & counted
        den = weights[inside].sum()
        if den != 0:
            means.append((weights[inside] * losses[inside]).sum() / den)
    return np.sum(means) / len(means) if means else 0.0


def problem(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, K)).astype(np.float32)
    labels = rng.integers(0, K, N).astype(np.int32)
    labels[4] = -100  # ignored
    weights = rng.uniform(0.5, 2.0, N).astype(np.float32)
    return logits, labels, weights


def test_integer_labels_with_weights_and_ignored_examples():
    logits, labels, weights = problem()
    class_weights = np.linspace(0.5, 1.5, K).astype(np.float32)
    options = {"ignore_index": -100, "class_weights": class_weights, "sample_weights": weights}
    f = lambda z, reduction, **kw: jaxce.softmax_cross_entropy_with_integer_labels(
        z, labels, reduction=reduction, **options, **kw
    )
    per_example = np.asarray(f(logits, "none"), np.float64)  # already times w_i * c_y
    norm = weights * class_weights[np.where(labels >= 0, labels, 0)]
    counted = labels != -100
    want = np_segment_mean(per_example / norm, counted, norm, IDS, SEGMENTS)
    got = f(logits, "segment_mean", segment_ids=IDS, num_segments=SEGMENTS)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # The gradient: d/dz of sum_i c_i L_i with c_i = n_i / (den_s * #segments).
    den = np.array([norm[(IDS == s) & counted].sum() for s in range(SEGMENTS)])
    held = np.sum(den != 0)
    c = np.where(counted, norm / den[IDS] / held, 0.0) / np.where(counted, norm, 1.0)
    grad = jax.grad(lambda z: f(z, "segment_mean", segment_ids=IDS, num_segments=SEGMENTS))(logits)
    want_grad = jax.grad(lambda z: jnp.sum(c * f(z, "none")))(logits)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.uint16, np.uint32, np.int64, np.uint64])
def test_segment_ids_of_every_integer_dtype(dtype):
    """Ids in range give the same mean in every integer dtype (uint32 ids were all read as out
    of range: int32's minimum, converted to uint32, wrapped to 2**31); the fused loss and the
    divergence too."""
    logits, labels, weights = problem()
    labels = np.maximum(labels, 0)
    per_example = np.asarray(
        jaxce.softmax_cross_entropy_with_integer_labels(logits, labels), np.float64
    )
    want = np_segment_mean(per_example, np.ones(N, bool), np.ones(N), IDS, SEGMENTS)
    x = np.eye(N, D, dtype=np.float32)
    w = np.zeros((D, K), np.float32)
    with jax.enable_x64(True):
        ids = IDS.astype(dtype)
        options = dict(reduction="segment_mean", segment_ids=ids, num_segments=SEGMENTS)
        got = jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, **options)
        fused = jaxce.linear_softmax_cross_entropy(x, w, labels, **options)
        divergence = jaxce.softmax_divergence(logits, logits, **options)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(fused, np.log(K), rtol=1e-6)  # (zero logits: log K each)
    np.testing.assert_allclose(divergence, 0.0, atol=1e-6)


def test_soft_labels_and_divergence_and_fused_agree_with_the_reference():
    logits, labels, weights = problem(1)
    labels = np.where(labels < 0, 0, labels)
    soft = np.eye(K, dtype=np.float32)[labels] * 0.8 + 0.2 / K
    teacher = np.random.default_rng(2).standard_normal((N, K)).astype(np.float32)
    x = np.random.default_rng(3).standard_normal((N, D)).astype(np.float32)
    w = np.random.default_rng(4).standard_normal((D, K)).astype(np.float32)
    counted = np.ones(N, bool)
    cases = {
        "soft": lambda r, **kw: jaxce.softmax_cross_entropy(logits, soft, reduction=r, **kw),
        "divergence": lambda r, **kw: jaxce.softmax_divergence(
            logits, teacher, kind="jsd", reduction=r, **kw
        ),
        "fused": lambda r, **kw: jaxce.linear_softmax_cross_entropy(
            x, w, labels, reduction=r, block_size=5, **kw
        ),
    }
    for name, f in cases.items():
        per_example = np.asarray(f("none", sample_weights=weights), np.float64) / weights
        want = np_segment_mean(per_example, counted, weights, IDS, SEGMENTS)
        got = f("segment_mean", sample_weights=weights, segment_ids=IDS, num_segments=SEGMENTS)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)


def test_fused_gradients_equal_the_in_place_loss():
    _, labels, weights = problem(2)
    x = np.random.default_rng(5).standard_normal((N, D)).astype(np.float32)
    w = np.random.default_rng(6).standard_normal((D, K)).astype(np.float32)
    seg = {"segment_ids": IDS, "num_segments": SEGMENTS, "reduction": "segment_mean",
               "ignore_index": -100, "sample_weights": weights}
    fused = lambda x, w: jaxce.linear_softmax_cross_entropy(x, w, labels, block_size=5, **seg)
    plain = lambda x, w: jaxce.softmax_cross_entropy_with_integer_labels(x @ w, labels, **seg)
    np.testing.assert_allclose(fused(x, w), plain(x, w), rtol=1e-6)
    for a, b in zip(jax.grad(fused, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_out_of_range_segment_ids_give_nan_and_uncounted_ones_do_not():
    logits, labels, _ = problem()
    f = lambda ids: jaxce.softmax_cross_entropy_with_integer_labels(
        logits, labels, ignore_index=-100, reduction="segment_mean", segment_ids=ids,
        num_segments=SEGMENTS,
    )
    assert np.isnan(f(IDS_with(0, SEGMENTS)))
    assert np.isnan(f(IDS_with(1, -1)))
    assert np.isfinite(f(IDS_with(4, 99)))  # example 4 is ignored: its id takes no part
    np.testing.assert_allclose(f(IDS_with(4, 99)), f(IDS), rtol=1e-6)


def IDS_with(i, value):
    ids = IDS.copy()
    ids[i] = value
    return ids


def test_all_examples_uncounted_gives_zero():
    logits, _labels, _ = problem()
    out = jaxce.softmax_cross_entropy_with_integer_labels(
        logits, np.full(N, -100), ignore_index=-100, reduction="segment_mean",
        segment_ids=IDS, num_segments=SEGMENTS,
    )
    assert out == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_segments": 3}, ValueError, "needs segment_ids"),
        ({"segment_ids": IDS}, ValueError, "needs num_segments, an int >= 1, got None"),
        ({"segment_ids": IDS, "num_segments": 0}, ValueError, "got 0"),
        ({"segment_ids": IDS[:5], "num_segments": 3}, ValueError, r"segment_ids shape \(5,\)"),
        ({"segment_ids": IDS.astype(np.float32), "num_segments": 3}, TypeError, "segment_ids"),
    ],
)
def test_bad_segment_arguments_raise(kwargs, error, message):
    logits, labels, _ = problem()
    with pytest.raises(error, match=message):
        jaxce.softmax_cross_entropy_with_integer_labels(
            logits, np.abs(labels), reduction="segment_mean", **kwargs
        )


def test_losses_without_segments_refuse_segment_mean():
    with pytest.raises(ValueError, match="reduction must be one of"):
        jaxce.nll_loss(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), reduction="segment_mean")


def test_segment_ids_are_global_across_a_sharded_batch():
    logits, labels, weights = problem(3)
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    seg = {"reduction": "segment_mean", "num_segments": SEGMENTS, "ignore_index": -100}

    def local(z, y, ids, sw):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z, y, segment_ids=ids, sample_weights=sw, batch_axis_name="data", **seg
        )

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=P())
    one = lambda z: jaxce.softmax_cross_entropy_with_integer_labels(
        z, labels, segment_ids=IDS, sample_weights=weights, **seg
    )
    np.testing.assert_allclose(sharded(logits, labels, IDS, weights), one(logits), rtol=1e-6)
    got = jax.grad(lambda z: sharded(z, labels, IDS, weights))(logits)
    np.testing.assert_allclose(got, jax.grad(one)(logits), rtol=1e-5, atol=1e-7)
