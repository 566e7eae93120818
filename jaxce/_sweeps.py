r"""The sweep over the logits ``x @ w + bias`` a block of rows at a time, for the scalar
reductions: statistics and gradients in one pass.

With ``"mean"``/``"sum"`` the gradients are accumulated in the same sweep as the statistics
(three matmuls). Accumulating :math:`dw` over the blocks of rows reads and writes all of ``dw``
[D, V] once per block, and the default block shrinks as 1/V: that traffic grows as V². Blocks
of fewer than :data:`FUSED_MIN_ROWS` rows (and 16-bit weights beyond one tile) therefore take
the statistics over tiles of columns (:mod:`jaxce._tile_stats`, which read ``w`` once) and the
gradients from a second sweep over those tiles (:mod:`jaxce._tiles`); so do
``reduction="none"`` and a forward pass alone.

The temporaries of a block are a few ``block_size x V`` float32 arrays; the default
``block_size`` keeps them near :data:`BLOCK_BYTES` whatever V is, so the scratch memory stays
flat in V and in N. When ``block_size`` does not divide N, the last block ends at row N and
overlaps the one before; the overlapped rows' per-example outputs are recomputed (the same
values) and their gradients are counted once: nothing is padded or copied, ``w`` least of all.
"""

import jax
import jax.numpy as jnp
from jax import lax

from ._normalizer import Normalizer
from ._options import Options, check_varying
from ._row_cotangents import row_cotangents
from ._row_stats import row_stats
from ._spec import vary_over, varying_axes
from ._validation import check_floating, check_shape, compute_dtype, static_int
from ._value_checks import check_finite

BLOCK_BYTES = 32 * 2**20
"""The default ``block_size`` aims at about this many bytes of float32 ``block_size x V``
temporaries (the logits of a block, their cotangent and the slabs of ``dw``'s update: about one
``block_size x V`` float32 array's worth plus a few MiB on XLA:CPU)."""

SLAB_BYTES = 4 * 2**20
"""``dw`` is accumulated a slab of columns at a time, the product ``x_b^T dz`` of one slab
holding about this many bytes."""

FILTER_COLUMNS = 512
"""With ``gradient_filter`` the gradients are accumulated (and skipped) in slabs of at most this
many columns: narrow enough that the few likely classes of a block of rows leave most slabs to
skip, wide enough for efficient matmuls (measured in ``benchmarks/bench_linear.py``)."""

FUSED_MIN_ROWS = 512
"""With a scalar reduction, blocks of at least this many rows (or classes that fit in one tile)
compute the gradients in the statistics' sweep over blocks of rows (three matmuls); smaller
blocks, which would re-read ``w`` and re-read and re-write all of ``dw`` too often, take the
statistics over tiles of columns and the gradients from a second sweep over them (four
matmuls). Measured (``jit(value_and_grad)``, float32, against the naive loss): N=4096 D=512
V=16384 (blocks of 512) 0.93x in one sweep, 1.06x tiled; V=32768 (256) 1.05x and 1.06x;
N=2048 D=256 V=32768 (256) 0.96x and 0.86x."""

_TEMPS_PER_ROW = 1  # float32 [block, V] arrays XLA:CPU keeps alive at once, rounded (measured:
# 36-39 MiB of temp at 32 MiB / (4 V) rows for V = 32768 ... 262144, N=4096, D=512)


def default_block_size(num_rows: int, num_classes: int) -> int:
    """Rows per block: a power of two (>= 8) with about :data:`BLOCK_BYTES` of temporaries.

    A power of two divides typical batch sizes: no rows are recomputed in an overlapping last
    block.
    """
    budget = BLOCK_BYTES // (4 * _TEMPS_PER_ROW * max(num_classes, 1))
    rows = 8
    while rows * 2 <= budget:
        rows *= 2
    return max(1, min(num_rows, rows))


# ----------------------------------------------------------------------------------------------
# One sweep over the blocks of rows. Every mode reads the same logits z_b = x_b w + bias; the
# shared mathematics of _row_stats.py and _row_cotangents.py turns them into statistics and
# cotangents.


def block_logits(xb, w, bias, dtype):
    z = lax.dot_general(xb, w, (((1,), (0,)), ((), ())), preferred_element_type=dtype)
    return z if bias is None else z + bias.astype(dtype)


def _slab_columns(num_features):
    return max(128, SLAB_BYTES // (4 * num_features) // 128 * 128)


def _add_outer(dw, xb, dz, dtype):
    """``dw + xb^T dz`` in place, a slab of columns at a time: no ``[D, V]`` temporary.

    (XLA does not fuse the accumulation into the matmul, so a single ``dw + xb^T dz`` would
    hold a second ``[D, V]`` array.)
    """
    num_classes = dz.shape[1]
    cols = _slab_columns(dw.shape[0])

    def add(start, size, dw):
        dzc = lax.dynamic_slice_in_dim(dz, start, size, axis=1)
        prod = lax.dot_general(xb, dzc, (((0,), (0,)), ((), ())), preferred_element_type=dtype)
        slab = lax.dynamic_slice_in_dim(dw, start, size, axis=1) + prod
        return lax.dynamic_update_slice_in_dim(dw, slab, start, axis=1)

    return _blocks(num_classes, cols, add, dw)


def _filtered_products(dxb, dw, xb, w, dz, floor, dtype):
    """``dxb + dz w^T`` and ``dw + xb^T dz`` (either may be None) a column slab at a time,
    skipping (``lax.cond``) every slab where ``|dz| < floor`` (per row) holds everywhere."""
    num_classes = dz.shape[1]
    cols = min(_slab_columns(w.shape[0]), FILTER_COLUMNS)

    def add(start, size, carry):
        dzc = lax.dynamic_slice_in_dim(dz, start, size, axis=1)

        def work(carry):
            dxb, dw = carry
            dzl = dzc.astype(w.dtype)  # the matmuls run in the inputs' dtype
            if dxb is not None:
                wc = lax.dynamic_slice_in_dim(w, start, size, axis=1)
                dxb = dxb + lax.dot_general(
                    dzl, wc, (((1,), (1,)), ((), ())), preferred_element_type=dtype
                )
            if dw is not None:
                prod = lax.dot_general(
                    xb, dzl, (((0,), (0,)), ((), ())), preferred_element_type=dtype
                )
                slab = lax.dynamic_slice_in_dim(dw, start, size, axis=1) + prod
                dw = lax.dynamic_update_slice_in_dim(dw, slab, start, axis=1)
            return dxb, dw

        keep = jnp.any(jnp.abs(dzc) >= floor[:, None])
        return lax.cond(keep, work, lambda carry: carry, carry)

    # Inside shard_map both branches must vary over the same mesh axes: those of the products.
    axes = varying_axes(dz) | varying_axes(xb) | varying_axes(w)
    dxb, dw = (None if a is None else vary_over(a, axes - varying_axes(a)) for a in (dxb, dw))
    return _blocks(num_classes, cols, add, (dxb, dw))


def _blocks(total, size, fn, carry):
    """``fn(start, size, carry)`` over ``[0, total)`` in blocks, the last one ragged (static).

    The first block runs before the loop: inside ``shard_map`` its results give the carry the
    right varying axes (zeros do not vary over the batch axis, a block's sums do).
    """
    full, rest = divmod(total, size) if total else (0, 0)
    if full >= 1:
        carry = fn(0, size, carry)
    if full > 1:
        carry = lax.fori_loop(1, full, lambda i, c: fn(i * size, size, c), carry)
    if rest:
        carry = fn(full * size, rest, carry)
    return carry


def row_blocks(total, size, fn, carry):
    """``fn(start, skip, carry)`` over the rows ``[0, total)`` in blocks of the static ``size``.

    ``0 < size <= total``. The last block starts at ``total - size``: a ragged batch re-reads the
    last ``skip`` rows of the block before it, and ``fn`` must count the first ``skip`` rows of
    its block (0 but in the last block) in no accumulation.

    Every block runs inside the one loop. The logits of a block outside it (a smaller ragged
    one after it, or a first one before it) depend on nothing in the loop, so XLA may compute
    them while the loop's buffers (or an earlier sweep's) are live, in buffers of their own:
    the scratch doubles. XLA unrolls a loop of one step, so "a first block, then a loop over
    the others" doubles it for two blocks too.
    """
    count = -(-total // size)
    if count == 1:
        return fn(0, 0, carry)

    def step(i, carry):
        start = jnp.minimum(i * size, total - size)
        return fn(start, i * size - start, carry)

    return lax.fori_loop(0, count, step, _varying_like(lambda c: fn(0, 0, c), carry))


def linear_inputs(x, w, bias, where, block_size, opts: Options):
    """Validate the inputs every fused ``x @ w + bias`` function shares; return ``(x, w, bias,
    mask, block_size)``: ``x`` [..., D] and ``w`` [D, V] in their common dtype, ``bias`` [V],
    the boolean class mask ``where`` [V] (or None), and ``block_size`` a static int or None."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    check_floating("x", x)
    check_floating("w", w)
    dtype = jnp.result_type(x.dtype, w.dtype)  # a no-op in the usual case of equal dtypes
    x, w = x.astype(dtype), w.astype(dtype)
    if x.ndim < 1:
        raise ValueError(f"x must have shape [..., D], got shape {x.shape}")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w shape {w.shape} does not match x shape {x.shape}: expected [D, V], D={x.shape[-1]}"
        )
    num_classes = w.shape[1]
    if not num_classes:
        raise ValueError(f"w has no classes: shape {w.shape}")
    check_varying(opts, ("w", w), ("x", x))
    if bias is not None:
        bias = jnp.asarray(bias)
        check_floating("bias", bias)
        check_shape("bias", bias, (num_classes,), "w's classes")
    mask = None
    if where is not None:
        mask = jnp.asarray(where)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"where must be a boolean mask, got dtype {mask.dtype}")
        check_shape("where", mask, (num_classes,), "w's classes")
    block_size = static_int("block_size", block_size, optional=True)
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    check_finite("x", x, allow_neg_inf=False, batch_axis_name=opts.batch_axis_name)
    check_finite("w", w, allow_neg_inf=False, class_axis_name=opts.spec.class_axis_name)
    if bias is not None:  # a -inf bias, like a -inf logit, makes a class impossible: valid
        check_finite("bias", bias, class_axis_name=opts.spec.class_axis_name)
    return x, w, bias, mask, block_size


def row_block_outputs(n: int, size: int, block_fn, count: int, dtype):
    """``count`` per-example outputs [n] of ``block_fn(start) -> count arrays [size]`` (the
    rows ``[start, start + size)``), over blocks of rows (:func:`row_blocks`; an overlapped
    last block rewrites the same values)."""

    def body(start, skip, rows):
        new = block_fn(start)
        return tuple(lax.dynamic_update_slice_in_dim(r, v, start, 0) for r, v in zip(rows, new))

    rows = tuple(jnp.zeros((n,), dtype) for _ in range(count))
    return row_blocks(n, size, body, rows) if n else rows


def _varying_like(fn, carry):
    """``carry`` cast to vary over the mesh axes that ``fn(carry)`` varies over.

    Inside ``shard_map`` a loop's carry must keep its varying axes, but zeros vary over none
    and a block's sums over those of their inputs. ``fn`` is only traced (abstractly).
    """
    axes = []

    def probe(c):
        out = fn(c)
        axes.append(jax.tree.map(varying_axes, out))
        return out

    jax.eval_shape(probe, carry)
    return jax.tree.map(lambda a, ax: vary_over(a, ax - varying_axes(a)), carry, axes[0])


def fuses_gradients(num_classes: int, block: int, tile, dtype) -> bool:
    """Whether a scalar reduction computes its gradients in the forward sweep (see
    :data:`FUSED_MIN_ROWS`).

    Not for 16-bit weights beyond one tile: the row sweep sums ``dw`` over the blocks of rows in a
    float32 [D, V] buffer, the column sweep writes each tile once in ``w``'s dtype (measured at
    N=4096 D=512 V=32768 bfloat16: 0.61x the naive time with 81 MiB of temp, against 0.77x
    with 92 MiB).
    """
    if num_classes <= tile[1]:
        return True
    return block >= FUSED_MIN_ROWS and jnp.finfo(dtype).bits > 16


def _add_rows(dx, dxb, start):
    """``dx[start:start + len(dxb)] += dxb`` in place: the zero rows of an overlap add nothing."""
    rows = lax.dynamic_slice_in_dim(dx, start, dxb.shape[0]) + dxb.astype(dx.dtype)
    return lax.dynamic_update_slice_in_dim(dx, rows, start, 0)


def block_row_cotangents(g_loss, g_lse, start: int, size: int, skip):
    """``(fresh, g_loss, g_lse)`` of the rows ``[start, start + size)`` (``g_lse`` None reads
    as 0). The first ``skip`` rows, which a previous block already counted, are not ``fresh``
    and get cotangent 0: dz, and with it their share of every gradient, is 0 (as for an
    ignored row)."""
    fresh = lax.broadcasted_iota(jnp.int32, (size,), 0) >= skip
    gb = lax.dynamic_slice_in_dim(g_loss, start, size)
    glb = jnp.zeros_like(gb) if g_lse is None else lax.dynamic_slice_in_dim(g_lse, start, size)
    return fresh, jnp.where(fresh, gb, 0.0), jnp.where(fresh, glb, 0.0)


def add_block_grads(grads, xb, w, dz, dcw, start, fresh, g_loss, g_lse, gradient_filter, want,
                    dtype, add_dw):
    """A block's share added to ``grads = (dx, dw, dbias, dclass_weights)``: ``dx[start:] +=
    dz w^T`` and ``dw = add_dw(dw, xb, dz)`` (``x_b^T dz`` into the row sweep's ``[D, V]`` or a
    tile's ``[D, cols]``), each if ``want``-ed, ``dbias += sum(dz)`` and the block's ``dcw``;
    with ``gradient_filter`` the column slabs with negligible ``dz`` are skipped (the rows
    already counted, not ``fresh``, get an infinite floor: they keep no slab)."""
    dx, dw, db, dcw_acc = grads
    want_dx, want_dw, want_db = want
    if gradient_filter is not None and (want_dx or want_dw):
        floor = jnp.where(fresh, gradient_filter * (jnp.abs(g_loss) + jnp.abs(g_lse)), jnp.inf)
        dxb = jnp.zeros((xb.shape[0], xb.shape[1]), dtype) if want_dx else None
        dxb, dw = _filtered_products(dxb, dw, xb, w, dz, floor, dtype)
    else:
        dzl = dz.astype(w.dtype)  # the matmuls run in the inputs' dtype, accumulate in f32
        dxb = None
        if want_dx:
            dxb = lax.dot_general(dzl, w, (((1,), (1,)), ((), ())), preferred_element_type=dtype)
        if want_dw:
            dw = add_dw(dw, xb, dzl)
    if want_dx:
        dx = _add_rows(dx, dxb, start)
    if want_db:
        db = db + jnp.sum(dz, axis=0)
    if dcw is not None:
        dcw_acc = dcw_acc + dcw
    return dx, dw, db, dcw_acc


def sweep_rows(x, w, bias, labels, mask, class_weights, opts: Options, block: int, g_loss, want,
               gradient_filter=None):
    """Walk over the rows of ``x`` [N, D] in blocks of ``block``: the per-example statistics
    ``(loss, normalizer, target_mass, num_possible, correct)`` and, in the same pass, the
    gradients ``want = (dx, dw, dbias)`` (and ``dclass_weights`` with class weights) for the
    per-example cotangents ``g_loss`` [N]; ``gradient_filter`` (a float) skips the column slabs
    of a block where ``|dz| < gradient_filter * |g_loss|`` (row by row) everywhere.
    Returns ``(stats, grads)``.
    """
    spec = opts.spec
    n = x.shape[0]
    dtype = compute_dtype(jnp.result_type(x.dtype, w.dtype))
    want_dx, want_dw, want_db = want
    size = min(block, n)

    def body(start, skip, carry):
        rows, acc = carry
        xb = lax.dynamic_slice_in_dim(x, start, size)
        yb = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size), labels)
        z = block_logits(xb, w, bias, dtype)
        st = row_stats(z, yb, mask, class_weights, spec)
        norm, mass, count = st.normalizer, st.target_mass, st.num_possible
        new = (st.loss, norm.shift, norm.log_sum, mass, count, st.correct)
        rows = tuple(lax.dynamic_update_slice_in_dim(r, v, start, 0) for r, v in zip(rows, new))
        fresh, gb, glb = block_row_cotangents(g_loss, None, start, size, skip)
        dz, _, dcw = row_cotangents(z, yb, mask, class_weights, norm, mass, count, gb, glb, spec)
        add_dw = lambda dw, xb, dzl: _add_outer(dw, xb, dzl, dtype)
        acc = add_block_grads(
            acc, xb, w, dz, dcw, start, fresh, gb, glb, gradient_filter, want, dtype, add_dw
        )
        return rows, acc

    rows = tuple(jnp.zeros((n,), dtype) for _ in range(6))
    num_classes = w.shape[1]
    # dx stays in float32 when it still has to be summed over a sharded class axis.
    dx_dtype = dtype if spec.class_axis_name is not None else x.dtype
    acc = (
        jnp.zeros(x.shape, dx_dtype) if want_dx else None,
        jnp.zeros(w.shape, dtype) if want_dw else None,
        jnp.zeros((num_classes,), dtype) if want_db else None,
        None if class_weights is None else jnp.zeros_like(class_weights),
    )
    if n:
        rows, acc = row_blocks(n, size, body, (rows, acc))
    loss, shift, log_sum, mass, count, correct = rows
    return (loss, Normalizer(shift, log_sum), mass, count, correct), sum_shards(acc, opts)


def sum_shards(grads, opts: Options):
    """The gradients summed over the shards that each held a part of them."""
    dx, dw, db, dcw = grads
    if dx is not None and opts.spec.class_axis_name is not None:
        dx = lax.psum(dx, opts.spec.class_axis_name)  # each shard held a slice of the classes
    if opts.batch_axis_name is not None:  # each shard held a slice of the examples
        dw, db, dcw = (
            None if g is None else lax.psum(g, opts.batch_axis_name) for g in (dw, db, dcw)
        )
    return dx, dw, db, dcw


def cast_grads(grads, x, w, bias, class_weights):
    dx, dw, db, dcw = grads
    cast = lambda g, ref: None if g is None or ref is None else g.astype(ref.dtype)
    return cast(dx, x), cast(dw, w), cast(db, bias), cast(dcw, class_weights)
