"""Sharded cross-entropy on 8 simulated CPU devices: ``class_axis_name`` / ``batch_axis_name``.

Every sharded result (inside ``jax.shard_map`` on data x model meshes 8x1, 1x8 and 2x4, and
plain ``jax.jit`` with ``NamedSharding`` inputs) must equal the single-device result to float32
rounding, and the single-device result must equal a float64 reference written here with plain
``jax.numpy`` (no jaxce code). Gradients are taken outside ``shard_map``. The compiled HLO of
the vocabulary-parallel loss must move only O(N) values between devices.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce

assert jax.device_count() == 8, (
    f"tests/test_sharded.py needs 8 devices, found {jax.device_count()}: tests/conftest.py sets "
    "XLA_FLAGS=--xla_force_host_platform_device_count=8, which only works before JAX starts"
)

DATA, MODEL = "data", "model"
MESHES = [(8, 1), (1, 8), (2, 4)]  # (data, model)
N, V = 16, 48
LABELED = 36  # labels only in [0, 36): the last model slice (1x8: two slices) holds no label
IGNORE = -100
IGNORED_ROWS = slice(0, N // 2)  # the first data shard (8x1: the first four) holds only these
FULL = dict(label_smoothing=0.1, z_loss=1e-2, logit_softcap=4.0)


def mesh_of(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), (DATA, MODEL))


@functools.cache
def problem(integer: bool, seed: int = 0):
    """Fixed float32 inputs: logits of scale 3 (the softcap of 4 bites), labels, weights."""
    rng = np.random.default_rng(seed)
    z = (3.0 * rng.standard_normal((N, V))).astype(np.float32)
    if integer:
        labels = rng.integers(0, LABELED, size=N).astype(np.int32)
        labels[IGNORED_ROWS] = IGNORE
    else:
        labels = np.zeros((N, V), np.float32)
        labels[:, :LABELED] = rng.dirichlet(np.ones(LABELED), size=N)
    counted = np.ones(N, bool)
    counted[IGNORED_ROWS] = False
    return {
        "logits": z,
        "labels": labels,
        "counted": counted,
        "class_weights": rng.uniform(0.5, 2.0, V).astype(np.float32),
        "sample_weights": rng.uniform(0.5, 2.0, N).astype(np.float32),
        "cotangent": rng.standard_normal(N).astype(np.float32),  # reduction="none" -> scalar
    }


# ----------------------------------------------------------------------------------------------
# The float64 reference: plain jax.numpy under enable_x64, differentiated by jax.grad.


def reference_loss(z, labels, class_weights, sample_weights, counted, *, integer, reduction,
                   label_smoothing=0.0, z_loss=0.0, logit_softcap=None):
    c = logit_softcap
    zc = z if c is None else c * jnp.tanh(z / c)
    lse = jax.scipy.special.logsumexp(zc, axis=-1)
    y = jax.nn.one_hot(labels, V, dtype=z.dtype) if integer else labels  # -100: a zero row
    t = (1.0 - label_smoothing) * y + label_smoothing / V
    if class_weights is not None:
        t = t * class_weights
    loss = jnp.sum(t * (lse[:, None] - zc), axis=-1) + z_loss * lse**2
    loss = jnp.where(counted, loss, 0.0)
    norm = jnp.ones_like(loss)
    if integer and class_weights is not None:
        norm = class_weights[jnp.where(counted, labels, 0)]
    if sample_weights is not None:
        loss, norm = loss * sample_weights, norm * sample_weights
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    return jnp.sum(loss) / jnp.sum(jnp.where(counted, norm, 0.0))


# ----------------------------------------------------------------------------------------------
# The jaxce calls: single device, inside shard_map, and under jit with sharded inputs.


def jaxce_loss(a, *, integer, reduction, options, class_axis_name=None, batch_axis_name=None):
    """The jaxce loss on a dict of (local) arrays; ignored rows via ignore_index or where."""
    kw = dict(options, reduction=reduction, class_axis_name=class_axis_name,
              batch_axis_name=batch_axis_name)
    for name in ("class_weights", "sample_weights"):
        if name in a:
            kw[name] = a[name]
    if integer:
        return jaxce.softmax_cross_entropy_with_integer_labels(
            a["logits"], a["labels"], ignore_index=IGNORE, **kw
        )
    return jaxce.softmax_cross_entropy(a["logits"], a["labels"], where=a["counted"], **kw)


SPECS = {
    "logits": P(DATA, MODEL),
    "labels_int": P(DATA),
    "labels_soft": P(DATA, MODEL),
    "counted": P(DATA),
    "class_weights": P(MODEL),
    "sample_weights": P(DATA),
}


def specs_for(a, integer):
    key = lambda k: k if k != "labels" else ("labels_int" if integer else "labels_soft")
    return {k: SPECS[key(k)] for k in a}


def split(a, integer, with_weights):
    """(differentiable inputs, the rest), float64 when x64 is on."""
    names = ["logits"] + ([] if integer else ["labels"])
    names += ["class_weights", "sample_weights"] if with_weights == "both" else (
        ["sample_weights"] if with_weights == "sample" else [])
    diff = {k: jnp.asarray(a[k]) for k in names}
    rest = {k: jnp.asarray(a[k]) for k in ("labels", "counted") if k not in diff}
    return diff, rest


def scalarize(out, reduction, cotangent):
    return jnp.sum(out * cotangent) if reduction == "none" else out


REDUCTIONS = ("none", "sum", "mean")


def value_and_grads(loss_fn, diff, cotangent, reductions):
    """{reduction: (loss, grads)} in one compiled call: ``loss_fn(diff, reduction)``."""

    def all_reductions(diff):
        result = {}
        for reduction in reductions:
            f = lambda d, r=reduction: (scalarize(loss_fn(d, r), r, cotangent), loss_fn(d, r))
            (_, out), grads = jax.value_and_grad(f, has_aux=True)(diff)
            result[reduction] = (out, grads)
        return result

    return jax.jit(all_reductions)(diff)


@functools.cache
def single_device(integer, options_items, weights, reductions=REDUCTIONS):
    options = dict(options_items)
    a = problem(integer)
    diff, rest = split(a, integer, weights)

    def loss_fn(diff, reduction):
        return jaxce_loss({**diff, **rest}, integer=integer, reduction=reduction, options=options)

    return value_and_grads(loss_fn, diff, jnp.asarray(a["cotangent"]), reductions)


def shard_mapped(mesh_shape, integer, options, weights, reductions=REDUCTIONS):
    a = problem(integer)
    diff, rest = split(a, integer, weights)
    mesh = mesh_of(mesh_shape)

    def loss_fn(diff, reduction):  # jax.grad is taken outside shard_map
        def local(diff, rest):
            return jaxce_loss({**diff, **rest}, integer=integer, reduction=reduction,
                              options=options, class_axis_name=MODEL, batch_axis_name=DATA)

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(specs_for(diff, integer), specs_for(rest, integer)),
            out_specs=P(DATA) if reduction == "none" else P(),
        )(diff, rest)

    return value_and_grads(loss_fn, diff, jnp.asarray(a["cotangent"]), reductions)


@functools.cache
def value_and_grad_reference(integer, reduction, options_items, weights):
    a = problem(integer)
    with jax.enable_x64(True):
        diff, rest = split({k: np.asarray(v, np.float64) if v.dtype == np.float32 else v
                            for k, v in a.items()}, integer, weights)
        opts = dict(options_items)

        def f(diff):
            out = reference_loss(
                diff["logits"], diff.get("labels", rest.get("labels")),
                diff.get("class_weights"), diff.get("sample_weights"), rest["counted"],
                integer=integer, reduction=reduction, **opts,
            )
            return scalarize(out, reduction, jnp.asarray(a["cotangent"], jnp.float64)), out

        (_, out), grads = jax.value_and_grad(f, has_aux=True)(diff)
        return np.asarray(out), {k: np.asarray(v) for k, v in grads.items()}


def assert_close(actual, desired, rtol, what):
    desired = np.asarray(desired, np.float64)
    atol = rtol * max(float(np.max(np.abs(desired))), 1e-30)
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol,
                               err_msg=what)


def check_against(out, grads, out_ref, grads_ref, rtol, what):
    assert np.all(np.isfinite(np.asarray(out))), what
    assert_close(out, out_ref, rtol, f"{what}: loss")
    assert set(grads) == set(grads_ref)
    for k in grads:
        assert grads[k].dtype == jnp.float32, (what, k, grads[k].dtype)
        assert_close(grads[k], grads_ref[k], rtol, f"{what}: d{k}")


F32 = 2e-5  # float32 rounding, after a few psums over 8 devices
F64 = 1e-4  # single-device float32 against the float64 reference


def run_case(mesh_shape, integer, options, weights, reductions=REDUCTIONS):
    """Check single device against float64 and the mesh against single device; {r: loss}."""
    single = single_device(integer, tuple(sorted(options.items())), weights, reductions)
    sharded = shard_mapped(mesh_shape, integer, options, weights, reductions)
    for r in reductions:
        out_ref, g_ref = value_and_grad_reference(integer, r, tuple(sorted(options.items())), weights)
        check_against(*single[r], out_ref, g_ref, F64, f"single device vs float64, {r}")
        check_against(*sharded[r], *single[r], F32, f"mesh {mesh_shape} vs single device, {r}")
    return {r: np.asarray(sharded[r][0]) for r in reductions}


# ----------------------------------------------------------------------------------------------
# Loss and gradients on every mesh.


@pytest.mark.parametrize("integer", [True, False], ids=["int", "soft"])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_loss_and_grads_match_single_device(mesh_shape, integer):
    """Smoothing, z-loss, softcap, sample weights, ignored rows (a whole shard of them), a
    vocabulary slice without labels; reductions none, sum and mean."""
    out = run_case(mesh_shape, integer, FULL, "sample")
    assert np.all(out["none"][IGNORED_ROWS] == 0.0)
    assert np.all(out["none"][N // 2 :] > 0.0)


@pytest.mark.parametrize("integer", [True, False], ids=["int", "soft"])
@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_plain_loss_matches_single_device(mesh_shape, integer):
    run_case(mesh_shape, integer, {}, "none", reductions=("mean",))
