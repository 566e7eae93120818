"""Sums over the classes of a block of rows, in the forms XLA:CPU computes fastest: the
upcasts, the softcap, the possible classes and the targets the row statistics are built from."""

import jax
import jax.numpy as jnp
from jax import lax

from ._softmax import masked_fill
from ._spec import Spec, class_ids, class_sum, vary_over, varying_axes
from ._validation import (
    compute_dtype,
)

# ----------------------------------------------------------------------------------------------
# The shared mathematics on a block of rows holding all (local) classes: z is [..., K_local].


def upcast_unshared(x: jax.Array) -> jax.Array:
    """``x`` in the compute dtype; bfloat16 by its bits (exact), never by a shared ``convert``.

    bfloat16 is the upper half of a float32, so a 16-bit shift of its bits is the exact
    conversion. XLA:CPU merges equal ``convert``s of the logits (and rewrites
    ``convert(gather(z))`` as ``gather(convert(z))``); a convert with several users is not
    fused into the forward's reduction but written out whole: a float32 copy of the logits in
    temp memory (twice their size) and its page faults on every call. The label's logit and
    the backward pass (logits and soft labels) therefore upcast by bits; the forward's
    reductions keep the plain convert, each inside its own computation (see
    ``unless_impossible``).
    """
    if x.dtype == jnp.uint16:  # the bits of bfloat16 values
        return lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
    if x.dtype == jnp.bfloat16:
        return upcast_unshared(lax.bitcast_convert_type(x, jnp.uint16))
    return x.astype(compute_dtype(x.dtype))


def to_bits(a: jax.Array) -> jax.Array:
    """A 16-bit float array as its bits (uint16); other dtypes unchanged.

    XLA:CPU has no 16-bit float slices, updates or scatters: it converts the *whole* array to
    float32 around each one (or hoists a float32 copy of a loop-invariant operand out of the
    loop). Integer ones are native on every backend, and a bitcast costs nothing there.
    """
    return lax.bitcast_convert_type(a, jnp.uint16) if jnp.finfo(a.dtype).bits == 16 else a


def from_bits(a: jax.Array, dtype) -> jax.Array:
    """The inverse of :func:`to_bits`: ``a`` as ``dtype`` if it holds 16-bit bits."""
    return lax.bitcast_convert_type(a, dtype) if a.dtype == jnp.uint16 else a


def softcap(z: jax.Array, spec: Spec) -> jax.Array:
    r""":math:`c \tanh(z / c)` (Gemma 2's logit soft-capping), or ``z`` when no cap is set."""
    c = spec.logit_softcap
    return z if c is None else c * jnp.tanh(z / c)


def softcap_keeping_impossible(z: jax.Array, spec: Spec) -> jax.Array:
    """:func:`softcap`, with a -inf logit (an impossible class) kept at -inf by arithmetic:
    ``min(z - lowest, 0)`` is 0 for every finite or +inf ``z`` and -inf for -inf. A select
    there (or a compare) would not be fused into the row sums on XLA:CPU, and the capped
    [N, K] logits would be written out for them (512 MiB at N=4096 K=32768 float32, and 4x
    the plain forward's time). Where a select masks the logits anyway, :func:`softcap`.
    """
    if spec.logit_softcap is None:
        return z
    return softcap(z, spec) + jnp.minimum(z - jnp.finfo(z.dtype).min, 0.0)


def possible_classes(z, mask):
    """The classes that can have probability > 0: unmasked, with a logit above -inf.

    A -inf logit is an impossible class (before the softcap, which would map it to the finite
    -c): it gets probability 0 and label smoothing spreads no mass onto it.
    """
    possible = z > -jnp.inf
    return possible if mask is None else possible & mask


# XLA:CPU fuses arithmetic (add, mul, exp, max, min, upcasts, row broadcasts) into a reduction,
# but a compare, select, iota or integer convert inside one is not fused: its [N, K] operand is
# written to memory first and the pass is several times slower. The forward sums below are
# therefore pure arithmetic where they can be: a fast form that is exact when a row holds no
# -inf logit, and under a `lax.cond` an exact select-free form for the other rows. The cond's
# branches build their arrays from the raw inputs (a cond operand is materialised, and an
# upcast bf16 operand would be written out in float32). Those conds are for XLA:CPU only
# (`xla_cpu_form`): on GPU and TPU a cond inside the fused loss's loop would cost a round trip
# to the host per block, and the exact forms fuse there.

CPU_FORMS = True
"""Whether code compiled for XLA:CPU takes the forms measured fastest there
(:func:`xla_cpu_form`). The tests switch it off to run the other backends' forms on the CPU."""


def xla_cpu_form(cpu, plain):
    """``cpu()`` when compiled for XLA:CPU, ``plain()`` for every other backend: two forms of
    the same values, the first a workaround measured on XLA:CPU (one branch is compiled)."""
    if not CPU_FORMS:
        return plain()
    return lax.platform_dependent(cpu=cpu, default=plain)


ROW_CHUNK = 32768
"""The longest row XLA:CPU reduces at full speed (see :func:`reduce_rows`)."""


def row_chunk(num_classes: int) -> int | None:
    """The chunk :func:`reduce_rows` cuts rows of ``num_classes`` into on XLA:CPU: the largest
    divisor of ``num_classes`` in [ROW_CHUNK / 32, ROW_CHUNK] (1024 to 32768 classes), or None
    (rows that short, or no such divisor: summed whole)."""
    if num_classes <= ROW_CHUNK:
        return None
    shortest = max(ROW_CHUNK // 32, 1)
    return next((c for c in range(ROW_CHUNK, shortest - 1, -1) if num_classes % c == 0), None)


def reduce_rows(terms, full, rows=(), classes=(), op=jnp.sum, whole_rows=False):
    """``op`` (``jnp.sum`` or ``jnp.max``) over the last axis of ``terms(*full, *rows, *classes)``.

    ``full`` are [..., K] arrays, ``rows`` [...] arrays (given to ``terms`` as [..., 1]) and
    ``classes`` [K] arrays; ``terms`` is elementwise. XLA:CPU: rows longer than
    :data:`ROW_CHUNK` are reduced as chunks, the rows of 2D [N·K/C, C] views of ``full`` (each
    row array broadcast to a value per chunk), whose partial results ``op`` then folds per row.
    Measured on an AVX-512 Xeon (N·K = 2^26 float32): ``sum(exp(z - c))`` costs 0.4 ns per
    element on rows of up to 32768 classes and 2.6-3.3 ns beyond, 0.4 ns in chunks at
    K=131072; ``sum(y (c - z))`` 6-10 ns against 0.6 ns. Only the 2D form is fast (a
    [N, K/C, C] view is not), and only with the operands chunked before ``terms``.
    ``whole_rows``: no chunks on any backend (for the row blocks of :func:`in_row_blocks`,
    whose sums of a shared, written-out array measured faster whole).
    """
    def whole():
        return op(terms(*full, *(r[..., None] for r in rows), *classes), axis=-1)

    num_classes = full[0].shape[-1]
    chunk = None if whole_rows else row_chunk(num_classes)
    if chunk is None:
        return whole()

    def chunked():
        chunks = full[0].shape[:-1] + (num_classes // chunk,)
        partial = op(
            terms(
                *(_chunk_view(a, chunk) for a in full),
                *(jnp.broadcast_to(r[..., None], chunks).reshape(-1, 1) for r in rows),
                *(
                    jnp.broadcast_to(a.reshape(-1, chunk), chunks + (chunk,)).reshape(-1, chunk)
                    for a in classes
                ),
            ),
            axis=-1,
        )
        return op(partial.reshape(chunks), axis=-1)

    return xla_cpu_form(chunked, whole)


def _chunk_view(a, chunk):
    """``a`` [..., K] as [N·K/chunk, chunk]. A 16-bit input is viewed so behind an
    ``optimization_barrier`` (a bitcast, no copy): otherwise XLA:CPU moves the reshape after
    the sum's upcast, and its reduction of the upcast [N, K] then runs ~5x slower (bfloat16,
    N=1024 K=131072: ``sum(exp(z - c))`` 170 ms against 33 ms)."""
    view = a.reshape(-1, chunk)
    return lax.optimization_barrier(view) if jnp.finfo(a.dtype).bits == 16 else view


def sum_exp(z, shift):
    r""":math:`\sum_k e^{z_k - c}` over the last axis of ``z`` [..., K] for a row shift c [...];
    ``z`` in any float dtype, upcast to the shift's inside the sum."""
    return reduce_rows(lambda z, c: jnp.exp(z.astype(c.dtype) - c), (z,), (shift,))


def summable(raw, z, mask, spec: Spec):
    """The logits to hand a row sum: the raw input where ``z`` = :func:`capped_logits` is only
    its upcast (no mask, no cap), so that a long row's chunks are cut from the 16-bit input
    (see :func:`reduce_rows`); otherwise ``z``."""
    return raw if mask is None and spec.logit_softcap is None else z


def possible_indicator(z):
    """1 for a logit above -inf, 0 for -inf, as ``min(exp(z - lowest), 1)``: no compare.

    Piecewise constant, so its gradient is 0 (and never inf * 0 from the overflowing exp).
    """
    lowest = jnp.finfo(z.dtype).min
    return lax.stop_gradient(jnp.minimum(jnp.exp(z - lowest), 1.0))


def finite_gap(t, z, shift):
    """``sum_k t_k (c - z_k)``, reading a -inf logit as a finite one: exact where t_k = 0 there.

    The halves ``c/2 - max(z, lowest)/2`` are finite for every pair, so a zero target on an
    impossible class gives 0, not 0 * inf; doubling the sum overflows to +inf exactly when
    the full-scale sum would (halving and doubling are exact in binary floating point).
    """
    half = 0.5 * shift[..., None] - 0.5 * jnp.maximum(z, jnp.finfo(z.dtype).min)
    return 2.0 * jnp.sum(t * half, axis=-1)


def exact_gap(t, z, shift):
    """``sum_k xdiff(t_k, c, z_k)`` without selects: +inf where a target t_k > 0 meets -inf."""
    lost = jnp.sum(t * (1.0 - possible_indicator(z)), axis=-1)  # mass on impossible classes
    return jnp.where(lost > 0, jnp.inf, finite_gap(t, z, shift))


def if_all_finite(check, fast, exact):
    """``fast()`` if all of ``check`` is finite, else ``exact()``.

    Under ``shard_map`` both branches must vary over the same mesh axes: ``fast`` builds its
    constants from data (``0 * x + K``), not with ``jnp.full``. XLA:CPU only; elsewhere
    ``exact()``.
    """
    return xla_cpu_form(lambda: lax.cond(jnp.all(jnp.isfinite(check)), fast, exact), exact)


def _no_impossible(raw):
    """Whether no logit of ``raw`` is -inf: a min in their own dtype (True when empty)."""
    return jnp.min(raw, initial=jnp.inf) > -jnp.inf


def unless_impossible(raw, fast, exact):
    """``fast()`` if no logit of ``raw`` is -inf, else ``exact()``; both build from raw inputs.

    float32 logits: ``fast()`` runs first, and its results are the test (a -inf logit, capped
    or not, makes the fast sums infinite or NaN), at no cost. Otherwise the test is a min of
    the raw logits, and ``fast()`` runs inside the cond: for bfloat16 / float16 its upcast of
    the logits is then its own, where XLA:CPU merges equal upcasts and writes one feeding two
    reductions out whole as a float32 copy (twice the logits' size, and its page faults on
    every call). XLA:CPU only; elsewhere ``exact()``.
    """
    if not low_precision(raw):
        def checked_fast():
            value = fast()
            leaves = jax.tree.leaves(value)
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in leaves]))
            return lax.cond(finite, lambda: value, exact)

        return xla_cpu_form(checked_fast, exact)
    return xla_cpu_form(lambda: lax.cond(_no_impossible(raw), fast, exact), exact)


def low_precision(raw) -> bool:
    return raw.dtype != compute_dtype(raw.dtype)


def in_row_blocks(fn, raw, *rows, blocked: bool = True):
    """``fn(raw, *rows)`` computed over blocks of rows with ``lax.map``: for the exact sums.

    ``raw`` is [..., K]; each of ``rows`` (or None) has the same leading batch shape; ``fn``
    maps them to arrays of the batch shape. A low-precision upcast feeding several
    reductions is written out whole (see ``upcast_unshared``), and so is a select (a masked
    or softcapped logit) feeding several; in blocks, that scratch is one block's (at most
    4 MiB of float32), not the logits' size. bfloat16 blocks enter as bits and are upcast by
    them: XLA turns the converts of the blocks into one convert of the whole array before the
    loop. ``blocked=False`` computes ``fn`` on the whole batch at once (the caller knows it
    shares no upcast or select), and so do backends other than XLA:CPU.
    """
    if not blocked:
        return fn(raw, *rows)
    return xla_cpu_form(lambda: _blocks_of_rows(fn, raw, rows), lambda: fn(raw, *rows))


def _blocks_of_rows(fn, raw, rows):
    """:func:`in_row_blocks`' XLA:CPU form: ``fn`` over blocks of rows with ``lax.map``."""
    batch = raw.shape[:-1]
    bits = lambda x: lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x
    unbits = lambda x: upcast_unshared(x) if x.dtype == jnp.uint16 else x
    flat = jax.tree.map(lambda r: bits(r).reshape((-1,) + r.shape[len(batch):]), (raw, *rows))
    # Inside shard_map lax.map needs its inputs to vary over the same mesh axes.
    axes = frozenset().union(*map(varying_axes, jax.tree.leaves(flat)))
    flat = jax.tree.map(lambda r: vary_over(r, axes - varying_axes(r)), flat)
    block = max(1, 2**20 // raw.shape[-1])
    out = lax.map(lambda xs: fn(*jax.tree.map(unbits, xs)), flat, batch_size=block)
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


def count_possible(raw, mask, class_weights, spec: Spec):
    """``(K_m, W_m)``: the number and total weight of each row's possible classes (all shards).

    Without a mask: K and sum(w) when no logit is -inf (a min pass tests it, no count);
    otherwise, under a cond, sums of the arithmetic indicator (a count of compares would be
    written out as [N, K]). With a mask: the sums of the mask of possible classes.
    """
    dtype = compute_dtype(raw.dtype)
    w = jnp.ones(raw.shape[-1:], dtype) if class_weights is None else class_weights

    def sums(raw, mask):
        m = (possible_classes(raw, mask).astype(dtype) if mask is not None
             else possible_indicator(raw.astype(dtype)))
        return jnp.sum(m, axis=-1), jnp.sum(w * m, axis=-1)

    if mask is not None:
        counts = sums(raw, mask)
    else:
        first = upcast_unshared(raw[..., 0])  # (a row vector from data, see if_all_finite)
        exact = lambda: in_row_blocks(lambda raw: sums(raw, None), raw, blocked=low_precision(raw))
        counts = xla_cpu_form(
            lambda: lax.cond(
                _no_impossible(raw),
                lambda: (0.0 * first + raw.shape[-1], 0.0 * first + jnp.sum(w)),
                exact,
            ),
            exact,
        )
    return tuple(class_sum(c, spec) for c in counts)


def capped_logits(raw, mask, spec: Spec):
    """The softcapped logits with impossible classes at -inf, in the compute dtype.

    Without a mask this is the upcast and the cap: a -inf logit stays -inf, and no select is
    built (it would be written out before each reduction). (bfloat16 / float16 with a cap keep
    the select: XLA:CPU hands the sum of their fused cap to a YNNPACK reduction that writes out
    each constant of the cap as an [N, K] operand, 2 GiB at N=4096 K=32768.)
    """
    z = raw.astype(compute_dtype(raw.dtype))
    if mask is None and (spec.logit_softcap is None or not low_precision(raw)):
        return softcap_keeping_impossible(z, spec)
    return masked_fill(softcap(z, spec), possible_classes(raw, mask))


def smoothed_targets(
    labels, mask, possible, class_weights, spec: Spec, dtype, num_possible, columns=None, *,
    scattered: bool,
):
    """``(u, t)``: the smoothed labels u and the weighted targets t = w * u.

    Soft labels are masked by the user's ``mask`` (masked entries take no part, as in optax);
    an integer label is never masked away, so a label on a masked or -inf class meets a -inf
    logit and gives +inf (probability 0), not a silent 0. ``scattered`` (always for sparse
    labels) gives only the smoothing's share (``(None, None)`` without smoothing): the labels'
    entries are added to the cotangent by a scatter (``row_cotangents``), never as an [N, K]
    array; otherwise an integer label's target comes from comparing an iota with it.
    ``possible`` None: every class is possible (the smoothing's share is a row broadcast).
    """
    eps = spec.label_smoothing
    if spec.sparse_labels or (spec.integer_labels and scattered):
        if not eps:
            return None, None
        share = eps / jnp.maximum(num_possible, 1.0)[..., None]
        u = share if possible is None else jnp.where(possible, share, 0.0)
        return u, (u if class_weights is None else u * class_weights)
    if spec.integer_labels:
        u = (class_ids(possible.shape[-1], spec, columns) == labels[..., None]).astype(dtype)
    else:
        u = masked_fill(labels.astype(dtype), mask, 0.0)
    if eps:  # K_m (num_possible) comes from the forward pass: no recount
        share = eps / jnp.maximum(num_possible, 1.0)[..., None]
        u = (1.0 - eps) * u + jnp.where(possible, share, 0.0)
    t = u if class_weights is None else u * class_weights
    return u, t
