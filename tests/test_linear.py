"""linear_softmax_cross_entropy: the blockwise loss of ``x @ w + bias`` equals the unchunked one.

References: NumPy float64 (the closed forms lse - z_y and p - y) for the plain loss, and the
unchunked ``softmax_cross_entropy_with_integer_labels(x @ w + bias, ...)`` (itself tested against
NumPy in tests/test_losses.py) for every option, both run in float64 under ``enable_x64`` so the
comparison is tight; float32 and bf16 runs check the dtypes and the rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp

import jaxce
from jaxce import _sweeps, _tiles

IGNORE = -100


def make_problem(rng, n=13, d=6, v=11, ignored=(), masked=(), dtype=np.float64):
    x = rng.normal(size=(n, d)).astype(dtype)
    w = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(dtype)
    b = (0.5 * rng.normal(size=(v,))).astype(dtype)
    allowed = np.array([k for k in range(v) if k not in masked])
    y = rng.choice(allowed, size=n).astype(np.int32)
    y[list(ignored)] = IGNORE
    return x, w, b, y


def both(options, x, w, b, y, block_size, argnums=(0, 1, 2), reduction="mean", cotangent=None):
    """(value, grads) of the blockwise and the unchunked loss, summed against ``cotangent``."""

    def reduce(out):
        return jnp.sum(out * cotangent) if cotangent is not None else jnp.sum(out)

    def blockwise(x, w, b, cw, sw):
        return reduce(
            jaxce.linear_softmax_cross_entropy(
                x, w, y, bias=b, class_weights=cw, sample_weights=sw, reduction=reduction,
                block_size=block_size, **options,
            )
        )

    def plain(x, w, b, cw, sw):
        return reduce(
            jaxce.softmax_cross_entropy_with_integer_labels(
                x @ w + b, y, class_weights=cw, sample_weights=sw, reduction=reduction, **options
            )
        )

    return blockwise, plain


OPTIONS = {
    "plain": {},
    "ignore_index": dict(ignore_index=IGNORE),
    "label_smoothing": dict(label_smoothing=0.2),
    "z_loss": dict(z_loss=0.01),
    "logit_softcap": dict(logit_softcap=1.5),
    "base": dict(base=2),
    "where": "where",
    "class_weights": "class_weights",
    "sample_weights": "sample_weights",
    "everything": "everything",
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_unchunked_loss_and_gradients(rng, name, reduction):
    with jax.enable_x64(True):
        n, v = 13, 11
        masked = (2, 7) if name in ("where", "everything") else ()
        x, w, b, y = make_problem(rng, n=n, v=v, ignored=(1, 5), masked=masked)
        options = OPTIONS[name]
        cw = sw = None
        if isinstance(options, str):
            options = {}
            if name in ("where", "everything"):
                options["where"] = np.isin(np.arange(v), masked, invert=True)
            if name in ("class_weights", "everything"):
                cw = rng.uniform(0.5, 2.0, size=v)
            if name in ("sample_weights", "everything"):
                sw = rng.uniform(0.0, 2.0, size=n)
            if name == "everything":
                options.update(
                    ignore_index=IGNORE, label_smoothing=0.1, z_loss=0.01, logit_softcap=2.0,
                    base=2,
                )
        if "ignore_index" not in options:
            y = np.where(y == IGNORE, 0, y)
        cotangent = rng.normal(size=n) if reduction == "none" else None
        blockwise, plain = both(options, x, w, b, y, 4, reduction=reduction, cotangent=cotangent)
        argnums = tuple(i for i, a in enumerate((x, w, b, cw, sw)) if a is not None)
        args = (x, w, b, cw, sw)
        got, got_grads = jax.value_and_grad(blockwise, argnums=argnums)(*args)
        want, want_grads = jax.value_and_grad(plain, argnums=argnums)(*args)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        assert len(got_grads) == len(argnums)
        for g, h in zip(got_grads, want_grads):
            assert g.shape == h.shape
            np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12)


def numpy_reference(x, w, b, y):
    """Mean loss and its gradients in float64 NumPy: lse - z_y and (p - onehot) / N."""
    z = x @ w + b
    lse = logsumexp(z, axis=-1)
    n = len(y)
    loss = np.mean(lse - z[np.arange(n), y])
    dz = np.exp(z - lse[:, None])
    dz[np.arange(n), y] -= 1.0
    dz /= n
    return loss, dz @ w.T, x.T @ dz, dz.sum(0)


@pytest.mark.parametrize("n, v, block_size", [(1, 5, None), (17, 7, 4), (16, 33, 8), (9, 130, 5)])
def test_float32_matches_numpy(rng, n, v, block_size):
    x, w, b, y = make_problem(rng, n=n, v=v, dtype=np.float32)
    f = lambda x, w, b: jaxce.linear_softmax_cross_entropy(x, w, y, bias=b, block_size=block_size)
    loss, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b)
    ref = numpy_reference(*(a.astype(np.float64) for a in (x, w, b)), y)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref[0], rtol=2e-6)
    for g, r, a in zip(grads, ref[1:], (x, w, b)):
        assert g.dtype == jnp.float32 and g.shape == a.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "n, v, block_size",
    [(1, 1, 1), (10, 3, 3), (10, 37, 10), (10, 300, 64), (23, 300, 8), (23, 1, 8), (7, 130, 2)],
)
def test_ragged_blocks(rng, monkeypatch, n, v, block_size):
    # A tiny byte budget makes the dw accumulation go column slab by column slab (128 wide),
    # so V=300 also has a ragged last slab.
    monkeypatch.setattr(_sweeps, "SLAB_BYTES", 1024)
    with jax.enable_x64(True):
        x, w, b, y = make_problem(rng, n=n, v=v)
        blockwise, plain = both(dict(label_smoothing=0.1), x, w, b, y, block_size)
        got = jax.value_and_grad(blockwise, argnums=(0, 1, 2))(x, w, b, None, None)
        want = jax.value_and_grad(plain, argnums=(0, 1, 2))(x, w, b, None, None)
        for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-13)


def test_default_block_size_is_flat_in_v():
    expected = {32768: 256, 65536: 128, 131072: 64, 262144: 32}  # 32 MiB / (4 B * V)
    for v, rows in expected.items():
        assert _sweeps.default_block_size(4096, v) == rows
        assert rows * v * 4 * _sweeps._TEMPS_PER_ROW <= _sweeps.BLOCK_BYTES
    assert _sweeps.default_block_size(4096, 2**24) == 8  # never fewer than 8 rows
    assert _sweeps.default_block_size(5, 10) == 5


def test_bfloat16(rng):
    x, w, b, y = make_problem(rng, n=40, d=16, v=50, dtype=np.float32)
    xb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, b))
    f = lambda x, w, b: jaxce.linear_softmax_cross_entropy(x, w, y, bias=b, block_size=16)
    loss, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(xb, wb, bb)
    # Reference: the same bf16 numbers, computed in float64.
    ref = numpy_reference(*(np.asarray(a, np.float64) for a in (xb, wb, bb)), y)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5)
    for g, r, a in zip(grads, ref[1:], (xb, wb, bb)):
        assert g.dtype == jnp.bfloat16 and g.shape == a.shape
        # dz is rounded to bf16 before the matmuls (as the naive code's bf16 logit gradient).
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=2e-2, atol=2e-2 * abs(r).max())


def test_ignored_rows_and_all_ignored(rng):
    x, w, b, y = make_problem(rng, n=8, v=9, ignored=(0, 3), dtype=np.float32)
    f = lambda x, y: jaxce.linear_softmax_cross_entropy(x, w, y, ignore_index=IGNORE, block_size=3)
    loss, dx = jax.value_and_grad(f)(x, y)
    keep = y != IGNORE
    ref = numpy_reference(x[keep].astype(np.float64), w.astype(np.float64), 0.0, y[keep])
    np.testing.assert_allclose(loss, ref[0], rtol=2e-6)
    np.testing.assert_array_equal(dx[~keep], 0.0)
    np.testing.assert_allclose(dx[keep], ref[1], rtol=1e-5, atol=1e-7)
    for reduction in ("mean", "sum", "none"):
        g = lambda x, w: jnp.sum(
            jaxce.linear_softmax_cross_entropy(
                x, w, jnp.full(8, IGNORE), ignore_index=IGNORE, reduction=reduction, block_size=3
            )
        )
        loss, (dx, dw) = jax.value_and_grad(g, argnums=(0, 1))(x, w)
        assert loss == 0.0
        np.testing.assert_array_equal(dx, 0.0)
        np.testing.assert_array_equal(dw, 0.0)


def test_batch_dims_vmap_and_jit(rng):
    x, w, b, y = make_problem(rng, n=12, v=9, dtype=np.float32)
    x3, y3 = x.reshape(2, 2, 3, 6), y.reshape(2, 2, 3)
    per_example = jaxce.linear_softmax_cross_entropy(x3, w, y3, reduction="none", block_size=5)
    assert per_example.shape == (2, 2, 3)
    flat = jaxce.linear_softmax_cross_entropy(x, w, y, reduction="none", block_size=5)
    np.testing.assert_allclose(per_example.reshape(-1), flat, rtol=1e-6)

    f = lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y, block_size=4)
    vg = jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1)), in_axes=(0, None, 0)))
    losses, (dx, dw) = vg(x.reshape(2, 6, 6), w, y.reshape(2, 6))
    for i in range(2):
        xi, yi = x.reshape(2, 6, 6)[i], y.reshape(2, 6)[i]
        ref = numpy_reference(xi.astype(np.float64), w.astype(np.float64), 0.0, yi)
        np.testing.assert_allclose(losses[i], ref[0], rtol=2e-6)
        np.testing.assert_allclose(dx[i], ref[1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(dw[i], ref[2], rtol=1e-5, atol=1e-7)


def test_gradient_of_w_alone_and_of_aux(rng):
    with jax.enable_x64(True):
        x, w, b, y = make_problem(rng, n=10, v=8)
        kw = dict(z_loss=0.1, return_aux=True, block_size=3)

        def blockwise(x, w):
            loss, aux = jaxce.linear_softmax_cross_entropy(x, w, y, bias=b, **kw)
            return loss + jnp.sum(aux["logsumexp"] ** 2) + jnp.sum(aux["z_loss"])

        def plain(x, w):
            loss, aux = jaxce.softmax_cross_entropy_with_integer_labels(
                x @ w + b, y, reduction="mean", z_loss=0.1, return_aux=True
            )
            return loss + jnp.sum(aux["logsumexp"] ** 2) + jnp.sum(aux["z_loss"])

        got = jax.value_and_grad(blockwise, argnums=(0, 1))(x, w)
        want = jax.value_and_grad(plain, argnums=(0, 1))(x, w)
        for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, h, rtol=1e-10)
        # Only w perturbed: the forward pass skips dx.
        only_w = jax.grad(lambda w: jaxce.linear_softmax_cross_entropy(x, w, y, block_size=3))(w)
        ref = numpy_reference(x, w, 0.0, y)
        np.testing.assert_allclose(only_w, ref[2], rtol=1e-10)
        _, aux = jaxce.linear_softmax_cross_entropy(x, w, y, bias=b, **kw)
        _, want_aux = jaxce.softmax_cross_entropy_with_integer_labels(
            x @ w + b, y, reduction="mean", z_loss=0.1, return_aux=True
        )
        assert set(aux) == set(want_aux)
        for k in aux:
            np.testing.assert_allclose(aux[k], want_aux[k], rtol=1e-12)


def test_bad_labels_like_the_unchunked_loss(rng):
    x, w, b, y = make_problem(rng, n=4, v=5, dtype=np.float32)
    y = np.array([0, 5, 2, 1], np.int32)  # 5 is out of range: NaN
    where = np.array([True, True, False, True, True])  # a label on class 2: +inf
    got = np.asarray(jaxce.linear_softmax_cross_entropy(x, w, y, where=where, reduction="none"))
    assert np.isnan(got[1]) and np.isposinf(got[2]) and np.isfinite(got[[0, 3]]).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(w=np.ones((5, 3))), ValueError, r"w shape \(5, 3\) does not match x shape \(4, 6\)"),
        (dict(labels=np.zeros(3, np.int32)), ValueError, r"labels shape \(3,\)"),
        (dict(labels=np.zeros(4)), TypeError, "labels must have an integer dtype"),
        (dict(bias=np.ones(4)), ValueError, r"bias shape \(4,\)"),
        (dict(where=np.ones(3)), TypeError, "where must be a boolean mask"),
        (dict(where=np.ones(4, bool)), ValueError, r"where shape \(4,\)"),
        (dict(block_size=0), ValueError, "block_size must be a positive int"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(gradient_filter=-1.0), ValueError, "gradient_filter must be a finite float >= 0"),
        (dict(gradient_filter=float("nan")), ValueError, r"gradient_filter .* got nan"),
        (dict(gradient_filter=True), TypeError, "got True"),
    ],
)
def test_errors(kwargs, error, message):
    args = dict(x=np.ones((4, 6), np.float32), w=np.ones((6, 3), np.float32),
                labels=np.zeros(4, np.int32))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        jaxce.linear_softmax_cross_entropy(args.pop("x"), args.pop("w"), args.pop("labels"), **args)


def temp_bytes(f, *shapes):
    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    return step.lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_temp_memory_50x_below_naive():
    n, d, v = 4096, 512, 65536
    shapes = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    naive = temp_bytes(
        lambda x, w, y: optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean(), *shapes
    )
    ours = temp_bytes(lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y), *shapes)
    assert naive >= 2 * n * v * 4  # the logits and their gradient
    assert ours * 50 <= naive, (ours, naive)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize(
    "reduction, gradient_filter", [("mean", None), ("none", None), ("mean", 1e-30), ("none", 1e-30)]
)
def test_shard_map_class_and_batch_axes(rng, monkeypatch, reduction, gradient_filter, tiled):
    """On a 2 x 4 (data x model) mesh: w's V axis split over "model", the rows over "data";
    ``tiled``: gradients over tiles of 4 of the 6 local columns (the class ids offset by the
    shard's and the tile's start)."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    if tiled:
        force_column_tiles(monkeypatch, 4)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    x, w, b, y = make_problem(rng, n=16, d=5, v=24, ignored=(0, 9), dtype=np.float32)
    cw = rng.uniform(0.5, 2.0, size=24).astype(np.float32)
    sw = rng.uniform(0.5, 2.0, size=16).astype(np.float32)
    cotangent = rng.normal(size=16).astype(np.float32) if reduction == "none" else 1.0
    options = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=0.01, logit_softcap=4.0,
                   reduction=reduction, block_size=3, gradient_filter=gradient_filter)

    def single(x, w, b, cw, sw):
        out = jaxce.linear_softmax_cross_entropy(
            x, w, y, bias=b, class_weights=cw, sample_weights=sw, **options
        )
        return jnp.sum(cotangent * out)

    def sharded(x, w, b, cw, sw):
        def local(x, w, b, cw, sw, y):
            return jaxce.linear_softmax_cross_entropy(
                x, w, y, bias=b, class_weights=cw, sample_weights=sw, class_axis_name="model",
                batch_axis_name="data", **options,
            )

        specs = (P("data"), P(None, "model"), P("model"), P("model"), P("data"), P("data"))
        out_spec = P("data") if reduction == "none" else P()
        out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_spec)(
            x, w, b, cw, sw, y
        )
        return jnp.sum(cotangent * out)

    args = (x, w, b, cw, sw)
    want = jax.value_and_grad(single, argnums=(0, 1, 2, 3, 4))(*args)
    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3, 4)))(*args)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, h, rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# gradient_filter: skipped column slabs, bounded gradient error.

FILTER_SLAB = 128  # columns per slab under SLAB_BYTES = 1024


def peaked_problem(rng, n=24, d=16, v=300):
    """Logits whose likely classes lie in the first slab of 128 classes, except for the last rows.

    ``bias`` pushes the other classes down by 9, and by 5 the last three rows' labels, which
    sit in the last slab: the last block of 8 rows keeps that slab, the others skip it.
    """
    w = rng.normal(size=(d, v)) / np.sqrt(d)
    y = rng.integers(0, FILTER_SLAB, size=n).astype(np.int32)
    y[-3:] = [260, 280, 299]
    b = np.where(np.arange(v) < FILTER_SLAB, 0.0, -9.0)
    b[y[-3:]] = -5.0
    x = 0.5 * rng.normal(size=(n, d)) + 4.0 * w[:, y].T / np.sum(w[:, y] ** 2, axis=0)[:, None]
    return x, w, b, y


def filtered_reference(x, w, b, y, scale, threshold, block):
    """float64 NumPy: dz = scale (p - y), zeroed on the (row block, slab) pairs that the rule
    skips; returns (dx, dw, dbias, exact dx, exact dw, skipped, total, margin), margin being how
    close a slab's max |dz| / scale comes to the threshold (relative)."""
    n, v = x.shape[0], w.shape[1]
    z = x @ w + b
    p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    rel = p.copy()
    rel[np.arange(n), y] -= 1.0
    dz = scale[:, None] * rel
    kept = dz.copy()
    skipped = total = 0
    margin = np.inf
    for r in range(0, n, block):
        for c in range(0, v, FILTER_SLAB):
            top = np.abs(rel[r : r + block, c : c + FILTER_SLAB]).max()
            margin = min(margin, abs(np.log(top / threshold)))
            total += 1
            if top < threshold:
                kept[r : r + block, c : c + FILTER_SLAB] = 0.0
                skipped += 1
    return kept @ w.T, x.T @ kept, dz.sum(0), dz @ w.T, x.T @ dz, skipped, total, margin


def assert_within_filter_bound(dx, dw, exact_dx, exact_dw, x, w, scale, threshold, slack=0.0):
    """Each skipped dz entry is below threshold * scale_n: bound the change of dx and dw."""
    bound_dx = threshold * scale[:, None] * np.abs(w).sum(1)[None, :]
    bound_dw = threshold * (scale[:, None] * np.abs(x)).sum(0)[:, None]
    assert np.all(np.abs(dx - exact_dx) <= bound_dx + slack * np.abs(exact_dx).max())
    assert np.all(np.abs(dw - exact_dw) <= bound_dw + slack * np.abs(exact_dw).max())


@pytest.mark.parametrize("threshold", [1e-3, 3.5e-4])  # the latter keeps 1 slab more
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_filter_skips_slabs_within_the_bound(rng, monkeypatch, reduction, threshold):
    monkeypatch.setattr(_sweeps, "SLAB_BYTES", 1024)  # 128-column slabs: 3 per block at V=300
    block, n = 8, 24
    with jax.enable_x64(True):
        x, w, b, y = peaked_problem(rng, n=n)
        cotangent = rng.uniform(0.5, 2.0, size=n) if reduction == "none" else 1.0
        scale = cotangent if reduction == "none" else np.full(n, 1.0 / n)

        def f(x, w, b, gradient_filter):
            out = jaxce.linear_softmax_cross_entropy(
                x, w, y, bias=b, reduction=reduction, block_size=block,
                gradient_filter=gradient_filter,
            )
            return jnp.sum(cotangent * out)

        loss, (dx, dw, db) = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b, threshold)
        exact_loss, (ex_dx, ex_dw, ex_db) = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b, None)
        ref_dx, ref_dw, ref_db, np_dx, np_dw, skipped, total, margin = filtered_reference(
            x, w, b, y, scale, threshold, block
        )
        # The data's premise: some slabs are skipped, none is within 10% of the threshold.
        assert 0 < skipped < total and margin > 0.1, (skipped, total, margin)
        assert loss == exact_loss  # the forward pass is untouched
        np.testing.assert_allclose(db, ex_db, rtol=1e-12, atol=1e-15)  # so is the bias
        np.testing.assert_allclose(db, ref_db, rtol=1e-10, atol=1e-13)
        # Exactly the slabs of the rule are left out ...
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(ex_dw, np_dw, rtol=1e-10, atol=1e-13)
        # ... which changes the gradients, by no more than the bound.
        assert np.abs(dw - ex_dw).max() > 0 and np.abs(dx - ex_dx).max() > 0
        assert_within_filter_bound(dx, dw, ex_dx, ex_dw, x, w, scale, threshold)


@pytest.mark.parametrize("threshold", [0.0, 1e-30])
def test_gradient_filter_zero_is_exact(rng, monkeypatch, threshold):
    monkeypatch.setattr(_sweeps, "SLAB_BYTES", 1024)
    with jax.enable_x64(True):
        x, w, b, y = peaked_problem(rng)
        for reduction in ("mean", "none"):
            f = lambda x, w, b, t: jnp.sum(
                jaxce.linear_softmax_cross_entropy(
                    x, w, y, bias=b, reduction=reduction, block_size=8, gradient_filter=t
                )
            )
            got = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b, threshold)
            want = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b, None)
            for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(g, h, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize(
    "options",
    [dict(ignore_index=IGNORE), dict(label_smoothing=0.1), dict(z_loss=0.01),
     dict(logit_softcap=8.0), dict(return_aux=True)],
    ids=["ignore_index", "label_smoothing", "z_loss", "logit_softcap", "aux"],
)
def test_gradient_filter_bound_with_options(rng, monkeypatch, options):
    """The bound holds for every option: scale_n = |d loss / d loss_n| (+ |d loss / d lse_n|)."""
    monkeypatch.setattr(_sweeps, "SLAB_BYTES", 1024)
    threshold, n = 1e-3, 24
    with jax.enable_x64(True):
        x, w, b, y = peaked_problem(rng, n=n)
        if "ignore_index" in options:
            y[[2, 11]] = IGNORE
        lse_weight = rng.uniform(-1.0, 1.0, size=n)  # differentiate the aux's lse too

        def f(x, w, t):
            out = jaxce.linear_softmax_cross_entropy(
                x, w, y, bias=b, block_size=8, gradient_filter=t, **options
            )
            if options.get("return_aux"):
                out, aux = out
                out = out + jnp.sum(lse_weight * aux["logsumexp"])
            return out

        loss, (dx, dw) = jax.value_and_grad(f, argnums=(0, 1))(x, w, threshold)
        exact_loss, (ex_dx, ex_dw) = jax.value_and_grad(f, argnums=(0, 1))(x, w, None)
        assert loss == exact_loss
        counted = (y != IGNORE).sum()
        scale = np.where(y != IGNORE, 1.0 / counted, 0.0)
        if options.get("return_aux"):
            scale = scale + np.abs(lse_weight)
        assert np.abs(dw - ex_dw).max() > 0  # something was skipped
        assert_within_filter_bound(dx, dw, ex_dx, ex_dw, x, w, scale, threshold)


def test_gradient_filter_bfloat16_and_jit(rng, monkeypatch):
    monkeypatch.setattr(_sweeps, "SLAB_BYTES", 1024)
    threshold, n = 2.0**-8, 24
    x, w, b, y = peaked_problem(rng, n=n)
    xb, wb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w))
    bb = jnp.asarray(b, jnp.float32)

    def f(x, w, t):
        return jaxce.linear_softmax_cross_entropy(x, w, y, bias=bb, block_size=8, gradient_filter=t)

    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)
    loss, (dx, dw) = grad(xb, wb, threshold)
    exact_loss, (ex_dx, ex_dw) = grad(xb, wb, None)
    eager_loss, (eager_dx, eager_dw) = jax.value_and_grad(f, argnums=(0, 1))(xb, wb, threshold)
    assert loss.dtype == jnp.float32 and loss == exact_loss
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(eager_dx, np.float32), np.asarray(dx, np.float32),
                               rtol=1e-2, atol=1e-6)
    np.testing.assert_allclose(np.asarray(eager_dw, np.float32), np.asarray(dw, np.float32),
                               rtol=1e-2, atol=1e-6)
    as64 = lambda a: np.asarray(a, np.float64)
    dx, dw, ex_dx, ex_dw = map(as64, (dx, dw, ex_dx, ex_dw))
    assert np.abs(dw - ex_dw).max() > 0
    # bf16 rounds the results (8 bits): allow 2**-7 of the largest entry on top of the bound.
    assert_within_filter_bound(dx, dw, ex_dx, ex_dw, as64(xb), as64(wb), np.full(n, 1.0 / n),
                               threshold, slack=2.0**-7)


# ----------------------------------------------------------------------------------------------
# A ragged batch: the last block ends at row N and overlaps the one before it.

RAGGED = [(37, 8), (5, 8), (21, 8)]  # (N, block_size): 4 blocks + 3 rows, N < block, 2 + 5


def assert_blockwise_equals_unchunked(rng, options, args, block_size, reduction, gradient_filter):
    """Value and gradients of x, w, bias, class and sample weights of the blockwise loss (with
    ``gradient_filter``) equal the unchunked loss's (which takes no filter), in float64."""
    x, w, b, y, cw, sw = args
    cotangent = rng.normal(size=len(y)) if reduction == "none" else None
    pair = lambda opts: both(opts, x, w, b, y, block_size, reduction=reduction,
                             cotangent=cotangent)
    blockwise = pair(dict(options, gradient_filter=gradient_filter))[0]
    plain = pair(options)[1]
    args = (x, w, b, cw, sw)
    got, got_grads = jax.value_and_grad(blockwise, argnums=(0, 1, 2, 3, 4))(*args)
    want, want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2, 3, 4))(*args)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for g, h, a in zip(got_grads, want_grads, args):
        assert g.shape == a.shape
        np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gradient_filter", [None, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n, block_size", RAGGED)
def test_overlapping_last_block_counts_each_row_once(
    rng, n, block_size, reduction, gradient_filter
):
    """Value and gradients of x, w, bias, class and sample weights equal the unchunked loss's,
    with every option at once (the overlapped rows' stats are recomputed, their gradients
    counted once); a zero ``gradient_filter`` takes the slab-filtering path, exactly."""
    with jax.enable_x64(True):
        v = 11
        x, w, b, y = make_problem(rng, n=n, v=v, ignored=(1,), masked=(2, 7))
        cw = rng.uniform(0.5, 2.0, size=v)
        sw = rng.uniform(0.5, 2.0, size=n)
        options = dict(
            where=np.isin(np.arange(v), (2, 7), invert=True), ignore_index=IGNORE,
            label_smoothing=0.1, z_loss=0.01, logit_softcap=4.0,
        )
        args = (x, w, b, y, cw, sw)
        assert_blockwise_equals_unchunked(rng, options, args, block_size, reduction, gradient_filter)


@pytest.mark.parametrize("n, block_size", RAGGED)
def test_overlapping_last_block_matches_numpy(rng, n, block_size):
    """The plain mean loss and its gradients against float64 NumPy (lse - z_y, p - y), the
    per-example losses against optax."""
    with jax.enable_x64(True):
        x, w, b, y = make_problem(rng, n=n, v=13)

        def f(x, w, b, reduction="mean"):
            return jaxce.linear_softmax_cross_entropy(
                x, w, y, bias=b, reduction=reduction, block_size=block_size
            )

        loss, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b)
        ref = numpy_reference(x, w, b, y)
        np.testing.assert_allclose(loss, ref[0], rtol=1e-12)
        for g, r in zip(grads, ref[1:]):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)
        per_example = f(x, w, b, reduction="none")
        optax_loss = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y)
        np.testing.assert_allclose(per_example, optax_loss, rtol=1e-12)


def test_overlapping_last_block_with_differentiated_aux(rng):
    """``return_aux`` outputs differentiated too: the reduced loss recomputes the blocks with
    the logsumexp's cotangent, which the overlapped rows must not add twice either."""
    with jax.enable_x64(True):
        x, w, b, y = make_problem(rng, n=37, v=8)
        lse_weight = rng.normal(size=37)

        def blockwise(x, w, b):
            loss, aux = jaxce.linear_softmax_cross_entropy(
                x, w, y, bias=b, z_loss=0.1, return_aux=True, block_size=8
            )
            return loss + jnp.sum(lse_weight * aux["logsumexp"]) + jnp.sum(aux["z_loss"])

        def plain(x, w, b):
            loss, aux = jaxce.softmax_cross_entropy_with_integer_labels(
                x @ w + b, y, reduction="mean", z_loss=0.1, return_aux=True
            )
            return loss + jnp.sum(lse_weight * aux["logsumexp"]) + jnp.sum(aux["z_loss"])

        got = jax.value_and_grad(blockwise, argnums=(0, 1, 2))(x, w, b)
        want = jax.value_and_grad(plain, argnums=(0, 1, 2))(x, w, b)
        for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_filter_overlapping_last_block(rng, monkeypatch, reduction):
    """With a ragged batch the last block (rows 13..20 of 21) keeps or skips a slab by its own
    rows 16..20 only, as the reference's smaller last block does: the rows it re-reads (their
    cotangent zeroed) keep no slab, so it still skips the middle one."""
    monkeypatch.setattr(_sweeps, "SLAB_BYTES", 1024)  # 128-column slabs: 3 per block at V=300
    threshold, block, n = 1e-3, 8, 21
    with jax.enable_x64(True):
        x, w, b, y = peaked_problem(rng, n=n)
        cotangent = rng.uniform(0.5, 2.0, size=n) if reduction == "none" else 1.0
        scale = cotangent if reduction == "none" else np.full(n, 1.0 / n)

        def f(x, w, b):
            out = jaxce.linear_softmax_cross_entropy(
                x, w, y, bias=b, reduction=reduction, block_size=block, gradient_filter=threshold
            )
            return jnp.sum(cotangent * out)

        _, (dx, dw, db) = jax.value_and_grad(f, argnums=(0, 1, 2))(x, w, b)
        ref_dx, ref_dw, ref_db, *_, skipped, total, margin = filtered_reference(
            x, w, b, y, scale, threshold, block
        )
        assert 0 < skipped < total and margin > 0.1, (skipped, total, margin)
        np.testing.assert_allclose(db, ref_db, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "block_size, ragged, aligned", [(64, 1000, 1024), (64, 4095, 4096), (48, 1000, 960)]
)
def test_temp_memory_flat_in_ragged_n(reduction, block_size, ragged, aligned):
    """A batch that ``block_size`` does not divide takes no more scratch than one it divides
    (before the overlapping last block: 1.5x, its smaller block got buffers of its own)."""
    d, v = 64, 4096

    def temp(n):
        shapes = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )
        loss = lambda x, w, y: jnp.sum(
            jaxce.linear_softmax_cross_entropy(
                x, w, y, reduction=reduction, block_size=block_size
            )
        )
        return temp_bytes(loss, *shapes)

    block_bytes = block_size * v * 4  # one float32 [block, V] array: 1 MiB at 64 rows
    got, want = temp(ragged), temp(aligned)
    assert got <= 1.1 * want, (got, want)
    assert got <= 3 * block_bytes, (got, block_bytes)


# ----------------------------------------------------------------------------------------------
# The column-tiled gradient sweep (wide vocabularies): forced on small problems.


def force_column_tiles(monkeypatch, cols):
    """Tiles of ``cols`` columns, and the tiled sweep for the scalar reductions too."""
    monkeypatch.setattr(_tiles, "TILE_BYTES", 1)
    monkeypatch.setattr(_tiles, "MIN_TILE_COLUMNS", cols)
    monkeypatch.setattr(_sweeps, "FUSED_MIN_ROWS", 2**30)


@pytest.mark.parametrize("gradient_filter", [None, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("v", [8, 16, 21, 5])  # one tile, two, 2 + a ragged 5, narrower than one
def test_column_tiles_match_unchunked(rng, monkeypatch, v, reduction, gradient_filter):
    """Tiles of 8 columns, blocks of rows overlapping at the end (13 rows in blocks of 4 * V / 8,
    at least 4): value and gradients of x, w, bias, class and sample weights equal the
    unchunked loss's with every option at once."""
    force_column_tiles(monkeypatch, 8)
    n = 13
    assert _tiles.tile_shape(n, 6, v, 4) == (max(4, min(n, 4 * v // min(v, 8))), min(v, 8))
    with jax.enable_x64(True):
        masked = (2, 7) if v > 7 else (2,)
        x, w, b, y = make_problem(rng, n=n, v=v, ignored=(1, 6), masked=masked)
        y[-1] = v - 1  # a label in the ragged last tile's overlap
        cw = rng.uniform(0.5, 2.0, size=v)
        sw = rng.uniform(0.5, 2.0, size=n)
        options = dict(
            where=np.isin(np.arange(v), masked, invert=True), ignore_index=IGNORE,
            label_smoothing=0.1, z_loss=0.01, logit_softcap=4.0, base=2,
        )
        args = (x, w, b, y, cw, sw)
        assert_blockwise_equals_unchunked(rng, options, args, 4, reduction, gradient_filter)


@pytest.mark.parametrize("v", [16, 21])
def test_column_tiles_with_differentiated_aux_and_bfloat16(rng, monkeypatch, v):
    """The recomputing backward (aux differentiated) over tiles; bf16 keeps its dtypes."""
    force_column_tiles(monkeypatch, 8)
    with jax.enable_x64(True):
        x, w, b, y = make_problem(rng, n=11, v=v)

        def loss(f):
            def g(x, w, b):
                out, aux = f(x, w, b)
                return jnp.sum(out) + 0.3 * jnp.sum(aux["logsumexp"] * np.arange(11))
            return g

        kw = dict(z_loss=0.1, return_aux=True, label_smoothing=0.1)
        tiled = loss(lambda x, w, b: jaxce.linear_softmax_cross_entropy(
            x, w, y, bias=b, block_size=3, **kw))
        plain = loss(lambda x, w, b: jaxce.softmax_cross_entropy_with_integer_labels(
            x @ w + b, y, reduction="mean", **kw))
        got = jax.value_and_grad(tiled, argnums=(0, 1, 2))(x, w, b)
        want = jax.value_and_grad(plain, argnums=(0, 1, 2))(x, w, b)
        for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, h, rtol=1e-10, atol=1e-12)
    xb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (x, w, b))
    f = lambda x, w, b: jaxce.linear_softmax_cross_entropy(x, w, y, bias=b, block_size=3)
    val, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(xb, wb, bb)
    ref = jax.grad(f, argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (xb, wb, bb)))
    assert val.dtype == jnp.float32
    for g, h in zip(grads, ref):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(np.float32), h, rtol=0.05, atol=2e-3)


def test_column_tiles_keep_scratch_flat_in_v():
    """Default sizes, N=4096 D=512: the scratch of the wide vocabularies (column-tiled) stays
    within 1.25x of the narrowest's and under 64 MiB, and a ragged N=4000 takes no more."""
    n, d = 4096, 512

    def temp(n, v):
        shapes = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )
        return temp_bytes(lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y), *shapes)

    temps = [temp(n, v) for v in (32768, 65536, 131072, 262144)]
    assert max(temps) <= 1.25 * min(temps), temps
    assert max(temps) <= 64 * 2**20, temps
    assert temp(4000, 131072) <= 1.05 * temps[2]


@pytest.mark.parametrize("v", [32768, 131072, 262144])
def test_bfloat16_scratch_holds_no_float32_copy_of_w(v):
    """bfloat16, N=4096 D=512: ``dw`` is written a tile at a time in bfloat16, so the scratch
    holds no float32 [D, V] array (summing ``dw`` over blocks of rows in float32, or upcasting
    ``w`` whole, would: 92 / 544 / 1056 MiB before). XLA:CPU copies ``w``'s 16-bit bits once."""
    n, d = 4096, 512
    shapes = (
        jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
        jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    temp = temp_bytes(lambda x, w, y: jaxce.linear_softmax_cross_entropy(x, w, y), *shapes)
    assert temp <= d * v * 2 + 56 * 2**20, (temp, d * v * 2)
