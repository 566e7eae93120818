"""label_log_probs and linear_label_log_probs: per-example log p(label) and entropy of a tempered
softmax, in place, fused with ``x @ w + bias`` and sharded over the classes.

References: float64 NumPy (``scipy.special.log_softmax``) for the values and the closed forms
``(e_y - p) / tau`` and ``-p (log p + H) / tau`` for the gradients, and ``jax.grad`` of the
plain ``jax.numpy`` formulas in float64 (under ``enable_x64``) for the gradients of a GRPO-like
objective ``sum_n a_n log p_n + c sum_n H_n`` and of each output alone. The sharded results
(8 simulated CPU devices, tests/conftest.py) are compared with the single-device ones.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
from scipy.special import log_softmax

import jaxce
from jaxce import _tiles

IGNORE = -100
N, K, D = 12, 16, 6
BETA = 0.3  # the entropy's coefficient in the GRPO-like objective


def make_logits(rng, n=N, k=K, scale=8.0):
    """Logits of scale 8 (the softcap of 30 bites), labels, one -inf logit off the labels,
    the advantages a and entropy weights b of the objectives."""
    z = scale * rng.standard_normal((n, k))
    labels = rng.integers(0, k - 2, size=n).astype(np.int32)  # never on the last two classes
    z[0, k - 1] = -np.inf
    a = rng.standard_normal(n)
    b = rng.uniform(0.5, 1.5, size=n)
    return z, labels, a, b


def class_mask(k=K):
    mask = np.ones(k, bool)
    mask[k - 2] = False  # no label there
    return mask


# ----------------------------------------------------------------------------------------------
# References.


def np_reference(z, labels, *, temperature=1.0, softcap=None, mask=None, counted=None):
    """float64 NumPy: ``(log_probs, entropy, possible, p, log_p)`` (0 for uncounted rows;
    log p -inf and H 0 for a row without a possible class)."""
    z = np.asarray(z, np.float64)
    possible = z > -np.inf
    if mask is not None:
        possible = possible & np.broadcast_to(mask, z.shape)
    zc = z if softcap is None else softcap * np.tanh(z / softcap)
    zt = np.where(possible, zc / temperature, -np.inf)
    empty = ~possible.any(axis=-1)
    zt[empty] = 0.0  # (log_softmax of an all -inf row is NaN)
    log_p = np.where(possible, log_softmax(zt, axis=-1), -np.inf)
    p = np.exp(log_p)
    entropy = -np.sum(np.where(possible, p * np.where(possible, log_p, 0.0), 0.0), axis=-1)
    k = z.shape[-1]
    safe = np.clip(labels, 0, k - 1)
    lp = np.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    lp = np.where((labels >= 0) & (labels < k), lp, np.nan)
    if counted is not None:
        lp, entropy = np.where(counted, lp, 0.0), np.where(counted, entropy, 0.0)
    return lp, entropy, possible, p, log_p


def np_grad(z, labels, a, b, *, temperature=1.0, softcap=None, mask=None, counted=None):
    """The closed form d(sum a log p_y + b H)/dz in float64 NumPy."""
    _, entropy, possible, p, log_p = np_reference(
        z, labels, temperature=temperature, softcap=softcap, mask=mask
    )
    onehot = np.arange(z.shape[-1]) == labels[..., None]
    with np.errstate(invalid="ignore"):
        dzt = a[..., None] * (onehot - p) - b[..., None] * p * (log_p + entropy[..., None])
    sigma = 1.0 if softcap is None else 1.0 - np.tanh(np.asarray(z) / softcap) ** 2
    dz = np.where(possible, dzt / temperature * sigma, 0.0)
    if counted is not None:
        dz = np.where(np.asarray(counted)[..., None], dz, 0.0)
    return dz


def plain(z, labels, *, temperature=1.0, softcap=None, mask=None, counted=None):
    """The plain jax.numpy formulas (jax.nn.log_softmax), with double wheres for -inf."""
    possible = z > -jnp.inf
    if mask is not None:
        possible = possible & mask
    if counted is None:
        counted = jnp.ones(z.shape[:-1], bool)
    zc = z if softcap is None else softcap * jnp.tanh(z / softcap)
    zt = jnp.where(possible, zc / temperature, -jnp.inf)
    zt = jnp.where(counted[..., None], zt, 0.0)  # uncounted rows: no NaN in untaken branches
    log_p = jax.nn.log_softmax(zt, axis=-1)
    safe = jnp.where(possible, log_p, 0.0)
    entropy = -jnp.sum(jnp.where(possible, jnp.exp(safe) * safe, 0.0), axis=-1)
    lp = jnp.take_along_axis(log_p, jnp.where(counted, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(counted, lp, 0.0), jnp.where(counted, entropy, 0.0)


def objectives(a, b):
    """The GRPO-like objective and each output alone, as functions of (log_probs, entropy)."""
    return {
        "grpo": lambda lp, h: jnp.sum(a * lp) + BETA * jnp.sum(b * h),
        "log_probs": lambda lp, h: jnp.sum(a * lp),
        "entropy": lambda lp, h: jnp.sum(b * h),
    }


def values_and_grads(f, args, a, b, argnums=0):
    """``(log_probs, entropy, {objective: grads})`` of ``f(*args) -> (log_probs, entropy)``."""

    def run(*args):
        lp, h = f(*args)
        grads = {
            name: jax.grad(lambda *xs, o=o: o(*f(*xs)), argnums=argnums)(*args)
            for name, o in objectives(a, b).items()
        }
        return lp, h, grads

    return jax.jit(run)(*args)


def assert_tree_close(got, want, rtol, atol, what=""):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol, err_msg=what)


# ----------------------------------------------------------------------------------------------
# In place.

MASKS = ["none", "classes", "rows"]


def in_place_case(rng, mask_kind, ignored):
    z, labels, a, b = make_logits(rng)
    where, counted = None, np.ones(N, bool)
    if mask_kind == "classes":
        where = class_mask()
    elif mask_kind == "rows":
        where = np.ones(N, bool)
        where[[2, 7]] = False  # fully masked rows
        counted &= where
    if ignored:
        labels[[1, 5]] = IGNORE
        counted[[1, 5]] = False
    return z, labels, a, b, where, counted


@pytest.mark.parametrize("ignored", [False, True], ids=["all", "ignored"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_in_place_matches_references(rng, temperature, softcap, mask_kind, ignored):
    z, labels, a, b, where, counted = in_place_case(rng, mask_kind, ignored)
    options = {"temperature": temperature, "logit_softcap": softcap, "where": where,
                   "ignore_index": IGNORE if ignored else None}
    mask_rows = None
    if where is not None:
        mask_rows = where if where.shape == (K,) else where[:, None]
    with jax.enable_x64(True):
        f = lambda z: jaxce.label_log_probs(z, labels, return_entropy=True, **options)
        lp, h, grads = values_and_grads(f, (z,), a, b)
        assert lp.dtype == h.dtype == jnp.float64
        ref = {"temperature": temperature, "softcap": softcap, "mask": mask_rows, "counted": counted}
        ref_lp, ref_h = np_reference(z, labels, **ref)[:2]
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h, ref_h, rtol=1e-12, atol=1e-12)
        assert np.all(lp[~counted] == 0) and np.all(h[~counted] == 0)
        g = lambda z: plain(z, jnp.asarray(labels), temperature=temperature, softcap=softcap,
                            mask=None if mask_rows is None else jnp.asarray(mask_rows),
                            counted=jnp.asarray(counted))
        want_lp, _want_h, want = values_and_grads(g, (z,), a, b)
        np.testing.assert_allclose(want_lp, ref_lp, rtol=1e-12, atol=1e-12)  # the plain code
        assert_tree_close(grads, want, 1e-10, 1e-12, "gradients vs jax.grad of the plain code")
        grpo = np_grad(z, labels, a, BETA * b, **ref)
        np.testing.assert_allclose(grads["grpo"], grpo, rtol=1e-10, atol=1e-12)
        assert np.all(grads["grpo"][~counted] == 0)
        # Without return_entropy: the same log-probabilities and their gradient.
        only = lambda z: jnp.sum(a * jaxce.label_log_probs(z, labels, **options))
        np.testing.assert_allclose(jax.grad(only)(z), grads["log_probs"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("where_shape", ["batch", "keepdims"])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_example_mask_leaves_junk_rows_out(rng, where_shape, softcap):
    """A ``where`` constant over the classes leaves out whole examples: NaN and infinite
    logits and out-of-range labels there reach neither the outputs nor the gradient."""
    z, labels, a, b = make_logits(rng)
    rows = np.ones(N, bool)
    rows[[2, 7]] = False
    junk, junk_labels = z.copy(), labels.copy()
    junk[2], junk[7, :3], junk_labels[7] = np.nan, np.inf, K + 4
    where = rows if where_shape == "batch" else rows[:, None]
    f = lambda z: jaxce.label_log_probs(
        z, junk_labels, where=where, logit_softcap=softcap, return_entropy=True
    )
    lp, h, grads = values_and_grads(f, (jnp.asarray(junk, jnp.float32),), a, b)
    ref = {"softcap": softcap, "mask": rows[:, None], "counted": rows}
    ref_lp, ref_h = np_reference(z, labels, **ref)[:2]
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-5)
    grpo = np_grad(z, labels, a, BETA * b, **ref)
    np.testing.assert_array_equal(np.asarray(grads["grpo"])[~rows], 0.0)
    np.testing.assert_allclose(grads["grpo"], grpo, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float64])
def test_in_place_dtypes(rng, dtype):
    """float32 and bf16 compute in float32 (bf16 inputs rounded first, references on the rounded
    values), float64 in float64; gradients come back in the logits' dtype."""
    z, labels, a, b, where, counted = in_place_case(rng, "classes", True)
    options = {"temperature": 0.7, "logit_softcap": 30.0, "where": where, "ignore_index": IGNORE}
    with jax.enable_x64(dtype == np.float64):
        zd = jnp.asarray(z, dtype)
        z64 = np.asarray(zd.astype(jnp.promote_types(dtype, jnp.float32)), np.float64)
        f = lambda z: jaxce.label_log_probs(z, labels, return_entropy=True, **options)
        out_dtype = np.float64 if dtype == np.float64 else np.float32
        lp, h, grads = values_and_grads(f, (zd,), a.astype(out_dtype), b.astype(out_dtype))
    assert lp.dtype == h.dtype == out_dtype
    assert all(g.dtype == dtype for g in grads.values())
    ref = {"temperature": 0.7, "softcap": 30.0, "mask": where, "counted": counted}
    ref_lp, ref_h = np_reference(z64, labels, **ref)[:2]
    tol = {np.float64: 1e-12, np.float32: 2e-5, jnp.bfloat16: 2e-5}[dtype]
    np.testing.assert_allclose(lp, ref_lp, rtol=tol, atol=tol * 50)
    np.testing.assert_allclose(h, ref_h, rtol=tol, atol=tol)
    want = np_grad(z64, labels, a, BETA * b, **ref)
    gtol = {np.float64: 1e-10, np.float32: 1e-5, jnp.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(np.asarray(grads["grpo"], np.float64), want, rtol=gtol, atol=gtol)


@pytest.mark.parametrize("forms", ["cpu", "plain"])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_rows_longer_than_a_chunk(dtype, entropy, softcap, forms, monkeypatch):
    """Rows of three chunks (``ROW_CHUNK`` shortened to 64 classes, so that XLA:CPU's forms
    take maxima and sums in chunks, see jaxce._row_sums.reduce_rows; whole batches and row
    blocks), -inf logits in every chunk, row 0 peaking 400 above the rest in its first chunk (a
    shift from another chunk would overflow): log-probabilities, entropies and the GRPO
    gradient against float64 on the rounded inputs."""
    from jaxce import _row_sums

    monkeypatch.setattr(_row_sums, "CPU_FORMS", forms == "cpu")
    monkeypatch.setattr(_row_sums, "ROW_CHUNK", 64)
    rng = np.random.default_rng(11)
    n, k = 6, 192
    z = 4 * rng.standard_normal((n, k))
    z[rng.random(z.shape) < 0.05] = -np.inf
    z[0, :64] += 400.0
    labels = np.array([int(rng.choice(np.flatnonzero(np.isfinite(row)))) for row in z], np.int32)
    a, b = rng.standard_normal(n), rng.uniform(0.5, 1.5, size=n)
    zd = jnp.asarray(z, dtype)
    z64 = np.asarray(zd.astype(jnp.float32), np.float64)
    options = {"temperature": 0.7, "logit_softcap": softcap}
    # (fresh functions: jit traces under this test's forms and chunk)
    if entropy:
        f = lambda z: jaxce.label_log_probs(z, labels, return_entropy=True, **options)
    else:
        f = lambda z: (jaxce.label_log_probs(z, labels, **options), jnp.zeros(n))
    lp, h, grads = values_and_grads(f, (zd,), a.astype(np.float32), b.astype(np.float32))
    ref = {"temperature": 0.7, "softcap": softcap}
    ref_lp, ref_h = np_reference(z64, labels, **ref)[:2]
    np.testing.assert_allclose(lp, ref_lp, rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(h, ref_h if entropy else 0.0, rtol=2e-5, atol=2e-5)
    want = np_grad(z64, labels, a, BETA * b if entropy else 0.0 * b, **ref)
    gtol = {np.float32: 1e-5, jnp.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(np.asarray(grads["grpo"], np.float64), want, rtol=gtol, atol=gtol)


def test_check_grads_in_reverse_mode(rng):
    z, labels, a, b = make_logits(rng, n=4, k=5, scale=2.0)
    with jax.enable_x64(True):
        def f(z):
            lp, h = jaxce.label_log_probs(z, labels % 5, temperature=0.7, logit_softcap=3.0,
                                          return_entropy=True)
            return jnp.sum(a * lp) + jnp.sum(b * h)

        check_grads(f, (np.where(np.isfinite(z), z, -5.0),), order=1, modes=["rev"])


def test_class_axes_and_batch_dims(rng):
    """Classes on axis 0, or on two axes (flattened in the order given), and a batch of
    shape (3, 4): the same numbers as the [N, K] layout."""
    z, labels, _, _ = make_logits(rng)
    lp, h = jaxce.label_log_probs(z, labels, return_entropy=True, temperature=0.7)
    lp0, h0 = jaxce.label_log_probs(z.T, labels, axis=0, return_entropy=True, temperature=0.7)
    np.testing.assert_allclose(lp0, lp, rtol=1e-6)
    np.testing.assert_allclose(h0, h, rtol=1e-6)
    lp2 = jaxce.label_log_probs(z.reshape(3, 4, 4, 4), labels.reshape(3, 4), axis=(2, 3),
                                temperature=0.7)
    np.testing.assert_allclose(lp2.reshape(-1), lp, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Edge cases: -inf logits, fully masked rows, huge logits, ignored rows, labels out of range.


def edge_logits():
    z = np.array([
        [0.0, -np.inf, 1.0, 2.0],  # label 0: an impossible class that takes no part
        [0.0, -np.inf, 1.0, 2.0],  # label 1: on the impossible class -> -inf
        [-np.inf] * 4,  # no possible class: -inf, entropy 0
        [1e4, -1e4, 0.0, 1e4],  # huge logits
        [-1e4, -1e4, -1e4 + 1.0, -1e4],
        [3.0, 0.0, 0.0, -2.0],  # fully masked below (where of the batch shape)
    ])
    labels = np.array([0, 1, 2, 3, 2, 0], np.int32)
    return z, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_edge_cases_are_finite_with_closed_form_gradients(temperature, softcap):
    z, labels = edge_logits()
    where = np.array([True] * 5 + [False])
    counted = where
    a = np.array([1.0, 1.0, 1.0, 1.0, -2.0, 1.0])
    b = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    options = {"temperature": temperature, "logit_softcap": softcap, "where": where}
    f = lambda z: jaxce.label_log_probs(z, labels, return_entropy=True, **options)
    lp, h = f(jnp.asarray(z, jnp.float32))
    ref_lp, ref_h = np_reference(z, labels, temperature=temperature, softcap=softcap,
                                 mask=where[:, None], counted=counted)[:2]
    assert ref_lp[1] == lp[1] == -np.inf and ref_lp[2] == lp[2] == -np.inf
    finite = np.isfinite(ref_lp)
    np.testing.assert_allclose(lp[finite], ref_lp[finite], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(h)) and h[2] == 0 and h[5] == 0 and lp[5] == 0
    # The gradient of every output (a -inf log-prob included) is finite: the closed form.
    for coef_a, coef_b in [(a * finite, 0 * b), (0 * a, b), (a * finite, b)]:
        def obj(z, coef_a=coef_a, coef_b=coef_b):
            lp, h = f(z)
            return jnp.sum(coef_a * jnp.where(finite, lp, 0.0)) + jnp.sum(coef_b * h)

        grad = jax.grad(obj)(jnp.asarray(z, jnp.float32))
        want = np_grad(z, labels, coef_a, coef_b, temperature=temperature,
                       softcap=softcap, mask=where[:, None], counted=counted)
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    # A label on an impossible class: gradient -p / tau on the possible classes, 0 on its own.
    g1 = jax.grad(lambda z: f(z)[0][1])(jnp.asarray(z, jnp.float32))[1]
    p = np.exp(np_reference(z, labels, temperature=temperature, softcap=softcap)[4][1])
    sigma = 1.0 if softcap is None else 1.0 - np.tanh(z[1] / softcap) ** 2
    np.testing.assert_allclose(g1, np.where(np.isfinite(z[1]), -p / temperature * sigma, 0.0),
                               rtol=1e-5, atol=1e-7)
    # ... as the integer-label cross-entropy (its loss is -log p_y = +inf, its gradient p).
    loss = lambda z: jaxce.softmax_cross_entropy_with_integer_labels(
        z, 1, logit_softcap=softcap) / temperature
    if temperature == 1.0:
        ce = jax.grad(loss)(jnp.asarray(z[1], jnp.float32))
        np.testing.assert_allclose(g1, -ce, rtol=1e-5, atol=1e-7)


def test_huge_logits_match_float64(rng):
    z = 1e4 * np.sign(rng.standard_normal((N, K))) + rng.standard_normal((N, K))
    labels = rng.integers(0, K, N).astype(np.int32)
    a, b = rng.standard_normal(N), rng.uniform(size=N)
    for temperature in (1.0, 0.7):
        f = functools.partial(jaxce.label_log_probs, labels=labels, return_entropy=True,
                              temperature=temperature)
        z32 = np.asarray(jnp.asarray(z, jnp.float32), np.float64)
        lp, h, grads = values_and_grads(f, (jnp.asarray(z32, jnp.float32),), a, b)
        ref_lp, ref_h = np_reference(z32, labels, temperature=temperature)[:2]
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-6, atol=1e-3)  # |log p| up to ~3e4
        np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-6)
        want = np_grad(z32, labels, a, BETA * b, temperature=temperature)
        np.testing.assert_allclose(grads["grpo"], want, rtol=1e-5, atol=1e-6)


def test_ignored_rows_give_exact_zeros_even_with_junk_logits(rng):
    """Ignored rows (junk logits: all -inf, +inf, NaN) give exactly 0 and a zero gradient row;
    ``(log_probs * mask).sum()`` meets no NaN."""
    z, labels, a, b = make_logits(rng)
    labels[[1, 4, 6]] = IGNORE
    z[1] = -np.inf
    z[4, 0] = np.inf
    z[6, 2] = np.nan
    z32 = jnp.asarray(z, jnp.float32)
    counted = labels != IGNORE
    for kw in [{}, {"temperature": 0.5, "logit_softcap": 30.0}]:
        f = lambda z, kw=kw: jaxce.label_log_probs(z, labels, ignore_index=IGNORE,
                                                  return_entropy=True, **kw)
        lp, h = f(z32)
        assert np.all(np.asarray(lp)[[1, 4, 6]] == 0) and np.all(np.asarray(h)[[1, 4, 6]] == 0)
        assert np.all(np.isfinite(lp)) and np.all(np.isfinite(h))
        obj = lambda z, f=f: jnp.sum(f(z)[0] * counted * a) + BETA * jnp.sum(f(z)[1] * b)
        grad = np.asarray(jax.grad(obj)(z32))
        assert np.all(grad[[1, 4, 6]] == 0) and np.all(np.isfinite(grad))


def test_labels_out_of_range_give_nan(rng):
    """Labels -1 and K: NaN log-prob and a NaN gradient row where it is differentiated; the
    entropy and the other rows are unaffected; ignore_index keeps its rows at 0."""
    z, labels, _a, _b = make_logits(rng)
    labels[3], labels[8], labels[9] = -1, K, IGNORE
    f = lambda z: jaxce.label_log_probs(z, labels, ignore_index=IGNORE, return_entropy=True)
    lp, h = f(jnp.asarray(z, jnp.float32))
    assert np.isnan(lp[3]) and np.isnan(lp[8]) and lp[9] == 0
    assert np.all(np.isfinite(np.delete(np.asarray(lp), [3, 8])))
    assert np.all(np.isfinite(h))
    grad_lp = np.asarray(jax.grad(lambda z: jnp.sum(f(z)[0]))(jnp.asarray(z, jnp.float32)))
    assert np.all(np.isnan(grad_lp[[3, 8]][np.isfinite(z[[3, 8]])]))
    assert np.all(np.isfinite(np.delete(grad_lp, [3, 8], axis=0)))
    grad_h = jax.grad(lambda z: jnp.sum(f(z)[1]))(jnp.asarray(z, jnp.float32))
    assert np.all(np.isfinite(grad_h))
    # uint8 labels with K = 256: 255 is a class, no wrap of K; int64 NumPy labels beyond int32.
    z256 = rng.standard_normal((2, 256))
    lp8 = jaxce.label_log_probs(z256, np.array([255, 0], np.uint8))
    np.testing.assert_allclose(lp8, log_softmax(z256, axis=-1)[[0, 1], [255, 0]], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Errors at trace time.


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a positive finite number, got 0.0"),
        ({"temperature": -1}, ValueError, r"temperature .* got -1.0"),
        ({"temperature": float("inf")}, ValueError, r"temperature .* got inf"),
        ({"temperature": float("nan")}, ValueError, r"temperature .* got nan"),
        ({"temperature": "hot"}, TypeError, "temperature must be a Python number, got 'hot'"),
        ({"temperature": np.ones(2)}, TypeError, "temperature must be a Python number"),
        ({"logits": np.ones((4, 3), np.int32)}, TypeError, "logits must have a real floating dtype, got int32"),
        ({"labels": np.zeros(4, np.float32)}, TypeError, "labels must have an integer dtype, got float32"),
        ({"labels": np.zeros(5, np.int32)}, ValueError, r"labels shape \(5,\) does not match logits shape without axis -1 \(4,\)"),
        ({"axis": 2}, ValueError, "axis 2 is out of range for an input of rank 2"),
        ({"where": np.ones(3, np.float32)}, TypeError, "where must be a boolean mask, got dtype float32"),
        ({"where": np.ones(5, bool)}, ValueError, r"where shape \(5,\) is not broadcastable"),
        ({"logit_softcap": -1.0}, ValueError, r"logit_softcap must be in \(0, 2\*\*100"),
        ({"return_entropy": "yes"}, TypeError, "return_entropy must be a bool, got 'yes'"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be a Python int"),
    ],
)
def test_errors(kwargs, error, message):
    args = {"logits": np.ones((4, 3), np.float32), "labels": np.zeros(4, np.int32)}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        jaxce.label_log_probs(args.pop("logits"), args.pop("labels"), **args)


def test_traced_temperature_is_refused():
    f = jax.jit(lambda t: jaxce.label_log_probs(jnp.ones((2, 3)), jnp.zeros(2, int), temperature=t))
    with pytest.raises(TypeError, match="temperature must be static"):
        f(0.5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a positive finite number, got 0.0"),
        ({"w": np.ones((5, 3), np.float32)}, ValueError, r"w shape \(5, 3\) does not match x shape \(4, 6\)"),
        ({"x": np.ones((4, 6), np.int32)}, TypeError, "x must have a real floating dtype, got int32"),
        ({"labels": np.zeros(3, np.int32)}, ValueError, r"labels shape \(3,\) does not match x's batch shape \(4,\)"),
        ({"bias": np.ones(4)}, ValueError, r"bias shape \(4,\) does not match w's classes \(3,\)"),
        ({"where": np.ones(3)}, TypeError, "where must be a boolean mask"),
        ({"where": np.ones(4, bool)}, ValueError, r"where shape \(4,\)"),
        ({"block_size": 0}, ValueError, "block_size must be a positive int or None, got 0"),
        ({"return_entropy": 1}, TypeError, "return_entropy must be a bool, got 1"),
    ],
)
def test_linear_errors(kwargs, error, message):
    args = {"x": np.ones((4, 6), np.float32), "w": np.ones((6, 3), np.float32),
                "labels": np.zeros(4, np.int32)}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        jaxce.linear_label_log_probs(args.pop("x"), args.pop("w"), args.pop("labels"), **args)


# ----------------------------------------------------------------------------------------------
# Fused x @ w + bias.


def linear_case(rng, n=N, v=K, ignored=True):
    x = rng.standard_normal((n, D))
    w = 3.0 * rng.standard_normal((D, v)) / np.sqrt(D)
    bias = 0.5 * rng.standard_normal(v)
    bias[v - 1] = -np.inf  # an impossible class
    labels = rng.integers(0, v - 2, size=n).astype(np.int32)
    if ignored:
        labels[[1, n - 1]] = IGNORE
    where = class_mask(v)
    a, b = rng.standard_normal(n), rng.uniform(0.5, 1.5, size=n)
    return x, w, bias, labels, where, a, b


def linear_values_and_grads(x, w, bias, labels, where, a, b, **options):
    f = lambda x, w, bias: jaxce.linear_label_log_probs(
        x, w, labels, bias=bias, where=where, ignore_index=IGNORE, return_entropy=True, **options
    )
    return values_and_grads(f, (x, w, bias), a, b, argnums=(0, 1, 2))


@pytest.mark.parametrize("block_size", [4, 5, None], ids=["divides", "ragged", "default"])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_matches_references(rng, temperature, softcap, block_size):
    """Blocks of 4 rows (dividing N=12), 5 (an overlapping last block) and the default: the
    values equal float64 NumPy's and the gradients of x, w and bias jax.grad's of the plain
    code on ``x @ w + bias``."""
    x, w, bias, labels, where, a, b = linear_case(rng)
    counted = labels != IGNORE
    options = {"temperature": temperature, "logit_softcap": softcap}
    with jax.enable_x64(True):
        lp, h, grads = linear_values_and_grads(
            x, w, bias, labels, where, a, b, block_size=block_size, **options
        )
        ref_lp, ref_h = np_reference(x @ w + bias, labels, temperature=temperature,
                                     softcap=softcap, mask=where, counted=counted)[:2]
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h, ref_h, rtol=1e-12, atol=1e-12)
        g = lambda x, w, bias: plain(x @ w + bias, jnp.asarray(labels), temperature=temperature,
                                     softcap=softcap, mask=jnp.asarray(where),
                                     counted=jnp.asarray(counted))
        want = values_and_grads(g, (x, w, bias), a, b, argnums=(0, 1, 2))[2]
        assert_tree_close(grads, want, 1e-10, 1e-12, "fused gradients vs the plain code")
        assert np.all(grads["grpo"][0][~counted] == 0)
        # The in-place function on the logits agrees.
        in_place = jaxce.label_log_probs(x @ w + bias, labels, where=where, ignore_index=IGNORE,
                                         **options)
        np.testing.assert_allclose(lp, in_place, rtol=1e-13, atol=1e-13)


def force_column_tiles(monkeypatch, cols):
    """Tiles of ``cols`` columns in the backward's column sweep (as tests/test_linear.py)."""
    monkeypatch.setattr(_tiles, "TILE_BYTES", 1)
    monkeypatch.setattr(_tiles, "MIN_TILE_COLUMNS", cols)


@pytest.mark.parametrize("v", [16, 21])  # two tiles of 8; two and a ragged, overlapping one
def test_fused_column_tiles(rng, monkeypatch, v):
    force_column_tiles(monkeypatch, 8)
    x, w, bias, labels, where, a, b = linear_case(rng, n=13, v=v)
    labels[-2] = v - 3  # a label in the ragged last tile's overlap
    counted = labels != IGNORE
    with jax.enable_x64(True):
        options = {"temperature": 0.7, "logit_softcap": 30.0}
        lp, h, grads = linear_values_and_grads(x, w, bias, labels, where, a, b, block_size=3,
                                               **options)
        g = lambda x, w, bias: plain(x @ w + bias, jnp.asarray(labels), temperature=0.7,
                                     softcap=30.0, mask=jnp.asarray(where),
                                     counted=jnp.asarray(counted))
        want_lp, want_h, want = values_and_grads(g, (x, w, bias), a, b, argnums=(0, 1, 2))
        np.testing.assert_allclose(lp, want_lp, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(h, want_h, rtol=1e-12, atol=1e-12)
        assert_tree_close(grads, want, 1e-10, 1e-12, "column tiles")


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_fused_dtypes(rng, dtype):
    x, w, bias, labels, where, a, b = linear_case(rng)
    xd, wd, bd = (jnp.asarray(t, dtype) for t in (x, w, bias))
    lp, h, grads = linear_values_and_grads(xd, wd, bd, labels, where, a, b, block_size=5,
                                           temperature=0.7)
    assert lp.dtype == h.dtype == jnp.float32
    assert [g.dtype for g in grads["grpo"]] == [dtype] * 3
    x64, w64, b64 = (np.asarray(t.astype(jnp.float32), np.float64) for t in (xd, wd, bd))
    counted = labels != IGNORE
    ref_lp, ref_h = np_reference(x64 @ w64 + b64, labels, temperature=0.7, mask=where,
                                 counted=counted)[:2]
    tol = 1e-5 if dtype == np.float32 else 2e-5
    np.testing.assert_allclose(lp, ref_lp, rtol=tol, atol=tol)
    np.testing.assert_allclose(h, ref_h, rtol=tol, atol=tol)
    dz = np_grad(x64 @ w64 + b64, labels, a, BETA * b, temperature=0.7, mask=where,
                 counted=counted)
    gtol = 1e-4 if dtype == np.float32 else 3e-2
    for got, want in zip(grads["grpo"], (dz @ w64.T, x64.T @ dz, dz.sum(0))):
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=gtol, atol=gtol * scale)


def test_fused_edge_cases():
    """-inf bias (an impossible class, one label on it), a label on a masked class, huge
    logits, ignored rows and an out-of-range label, against the in-place function."""
    z, labels = edge_logits()
    z = z[[0, 1, 3, 4, 5]]
    labels = np.array([0, 1, 3, IGNORE, 7], np.int32)  # 7: out of range
    x = np.eye(5, 4)  # x @ w + bias = the rows of w + bias
    w = np.where(np.isfinite(z[:4]), z[:4], 0.0)
    bias = np.array([0.0, -np.inf, 0.0, 0.0])
    where = np.array([True, True, True, False])
    f_fused = lambda x, w: jaxce.linear_label_log_probs(
        x, w, labels, bias=bias, where=where, ignore_index=IGNORE, return_entropy=True,
        block_size=2, temperature=0.7)
    f_place = lambda z: jaxce.label_log_probs(
        z, labels, where=where, ignore_index=IGNORE, return_entropy=True, temperature=0.7)
    x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    lp, h = f_fused(x32, w32)
    logits = x32 @ w32 + bias
    lp_p, h_p = f_place(logits)
    np.testing.assert_array_equal(np.isnan(lp), [False, False, False, False, True])
    assert lp[1] == -np.inf and lp[3] == 0 and h[3] == 0
    np.testing.assert_allclose(lp, lp_p, rtol=1e-6)
    np.testing.assert_allclose(h, h_p, rtol=1e-6, atol=1e-6)
    finite = np.isfinite(lp)
    obj = lambda lp, h: jnp.sum(jnp.where(finite, lp, 0.0)) + jnp.sum(h)
    gx, gw = jax.grad(lambda x, w: obj(*f_fused(x, w)), argnums=(0, 1))(x32, w32)
    gz = jax.grad(lambda z: obj(*f_place(z)))(logits)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))
    np.testing.assert_allclose(gw, x.T @ gz, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, gz @ w.T, rtol=1e-5, atol=1e-4)


def test_fused_batch_dims_and_vmap(rng):
    x, w, _bias, labels, _where, _a, _b = linear_case(rng, ignored=False)
    flat = jaxce.linear_label_log_probs(x, w, labels, block_size=5)
    nested = jaxce.linear_label_log_probs(x.reshape(3, 4, D), w, labels.reshape(3, 4))
    assert nested.shape == (3, 4)
    np.testing.assert_allclose(nested.reshape(-1), flat, rtol=1e-6)
    mapped = jax.vmap(lambda x, y: jaxce.linear_label_log_probs(x, w, y))(
        x.reshape(3, 4, D), labels.reshape(3, 4))
    np.testing.assert_allclose(mapped, nested, rtol=1e-6)


def test_fused_temp_memory_flat_in_v_and_30x_below_naive():
    """Compile only, N=4096 D=512: the GRPO step's scratch is the same at V=32768 and 131072
    (a few block x V float32 arrays, the block shrinking as 1/V), and >= 30x below the naive
    code's (the logits, log-probabilities, probabilities and their gradients)."""
    n, d = 4096, 512

    def temp(f, v):
        shapes = (jax.ShapeDtypeStruct((n, d), jnp.float32),
                  jax.ShapeDtypeStruct((d, v), jnp.float32),
                  jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))
        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    def ours(x, w, y, a):
        lp, h = jaxce.linear_label_log_probs(x, w, y, temperature=0.7, return_entropy=True)
        return jnp.sum(a * lp) + BETA * jnp.sum(h)

    def naive(x, w, y, a):
        log_p = jax.nn.log_softmax(x @ w / 0.7)
        lp = jnp.take_along_axis(log_p, y[:, None], axis=-1)[:, 0]
        return jnp.sum(a * lp) - BETA * jnp.sum(jnp.exp(log_p) * log_p)

    small, large = temp(ours, 32768), temp(ours, 131072)
    assert large <= 1.1 * small, (small, large)
    assert large <= 128 * 2**20, large
    naive_large = temp(naive, 131072)
    assert naive_large >= 2 * n * 131072 * 4  # the logits and their gradient at least
    assert 30 * large <= naive_large, (large, naive_large)


# ----------------------------------------------------------------------------------------------
# Sharded: classes split over "model", rows over "data", inside jax.shard_map.

DATA, MODEL = "data", "model"
MESHES = [(2, 4), (1, 8)]


def mesh_of(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), (DATA, MODEL))


def sharded_options():
    return {"temperature": 0.7, "logit_softcap": 30.0, "ignore_index": IGNORE, "return_entropy": True}


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_in_place_matches_single_device(rng, mesh_shape):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
    z, labels, a, b = make_logits(rng)
    labels[[1, 5]] = IGNORE
    labels[2] = K - 1  # on the last shard (and z[0, K - 1] = -inf there)
    where = class_mask()[None, :]  # the logits' rank (see _check_unambiguous)
    z32 = jnp.asarray(z, jnp.float32)

    def single(z):
        return jaxce.label_log_probs(z, labels, where=where, **sharded_options())

    def local(z, y, m):
        return jaxce.label_log_probs(z, y, where=m, class_axis_name=MODEL, **sharded_options())

    sharded = lambda z: jax.shard_map(
        local, mesh=mesh_of(mesh_shape), in_specs=(P(DATA, MODEL), P(DATA), P(None, MODEL)),
        out_specs=(P(DATA), P(DATA)),
    )(z, jnp.asarray(labels), jnp.asarray(where))
    got = values_and_grads(sharded, (z32,), a.astype(np.float32), b.astype(np.float32))
    want = values_and_grads(single, (z32,), a.astype(np.float32), b.astype(np.float32))
    assert_tree_close(got, jax.tree.map(np.asarray, want), 1e-5, 1e-6, f"mesh {mesh_shape}")
    ref_lp = np_reference(z, labels, temperature=0.7, softcap=30.0, mask=where,
                          counted=labels != IGNORE)[0]
    np.testing.assert_allclose(got[0], ref_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_fused_matches_single_device(rng, mesh_shape):
    """x and labels split over "data", w, bias and where over "model": dx is summed over the
    classes' shards, dw and dbias over the rows'."""
    x, w, bias, labels, where, a, b = linear_case(rng)
    labels[3] = K - 3
    x32, w32, b32 = (jnp.asarray(t, jnp.float32) for t in (x, w, bias))

    def single(x, w, bias):
        return jaxce.linear_label_log_probs(x, w, labels, bias=bias, where=where, block_size=4,
                                            **sharded_options())

    def local(x, w, bias, y, m):
        return jaxce.linear_label_log_probs(x, w, y, bias=bias, where=m, block_size=4,
                                            class_axis_name=MODEL, batch_axis_name=DATA,
                                            **sharded_options())

    sharded = lambda x, w, bias: jax.shard_map(
        local, mesh=mesh_of(mesh_shape),
        in_specs=(P(DATA), P(None, MODEL), P(MODEL), P(DATA), P(MODEL)),
        out_specs=(P(DATA), P(DATA)),
    )(x, w, bias, jnp.asarray(labels), jnp.asarray(where))
    a32, b32_ = a.astype(np.float32), b.astype(np.float32)
    got = values_and_grads(sharded, (x32, w32, b32), a32, b32_, argnums=(0, 1, 2))
    want = values_and_grads(single, (x32, w32, b32), a32, b32_, argnums=(0, 1, 2))
    assert_tree_close(got, jax.tree.map(np.asarray, want), 1e-5, 1e-5, f"mesh {mesh_shape}")


def test_sharded_without_vma_checks_raises():
    local = lambda z, y: jaxce.label_log_probs(z, y, class_axis_name=MODEL)
    f = jax.shard_map(local, mesh=mesh_of((2, 4)), in_specs=(P(DATA, MODEL), P(DATA)),
                      out_specs=P(DATA), check_vma=False)
    with pytest.raises(ValueError, match="class_axis_name='model', but logits does not vary"):
        f(jnp.ones((4, 8)), jnp.zeros(4, jnp.int32))


def test_optax_style_gather_agrees(rng):
    """The naive formula of the benchmark (log_softmax gathered at the labels) on float32."""
    z, labels, _, _ = make_logits(rng)
    z = np.where(np.isfinite(z), z, -30.0).astype(np.float32)
    naive = -optax.softmax_cross_entropy_with_integer_labels(z / 0.7, labels)
    np.testing.assert_allclose(jaxce.label_log_probs(z, labels, temperature=0.7), naive,
                               rtol=1e-5, atol=1e-5)
