r"""Cross-entropy losses on logits, with closed-form :math:`p - y` backward passes.

One piece of mathematics serves every path (in place, blockwise in :mod:`jaxce._linear`, and
sharded across a mesh axis). For one example with (softcapped) logits :math:`z`, class mask
:math:`m`, class weights :math:`w` and labels :math:`y` (a distribution, or a one-hot picked
by comparing an iota with the integer label), the effective target is

.. math::
    t_k = w_k\, m_k \big((1 - \varepsilon)\, y_k + \varepsilon / K_m\big),
    \qquad K_m = \textstyle\sum_k m_k,

and the loss, with :math:`T = \sum_k t_k` and :math:`\ell = \operatorname{lse}(z)`, is

.. math::
    L = \sum_k t_k (\ell - z_k) + \lambda_z \ell^2
      = T \log s + \sum_k t_k (c - z_k) + \lambda_z \ell^2,

with :math:`s = \sum_k e^{z_k - c}` for a per-row shift :math:`c`. Label distributions take
the maximum :math:`c = \max_k z_k`: every term on the right is then non-negative, so there is
no cancellation even for logits of 1e4. Integer labels take the label's own logit
:math:`c = z_y`, which needs no max pass: the plain loss is then :math:`\log s \ge 0` itself
(the label's term of s is 1), and a row whose :math:`e^{z_k - z_y}` overflows falls back to
the maximum. Its gradient is

.. math::
    \frac{\partial L}{\partial z_k} = p_k (T + 2 \lambda_z \ell) - t_k,

which is :math:`p - y` for a plain one-hot or distribution label. Everything a path needs
is a gathered label logit or a max, and sums over classes; a sharded path combines them with
``psum``/``pmax``.
"""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from ._checked import check_distribution, check_finite, check_labels, check_unit_interval
from ._information import xdiff
from ._softmax import finite_or_zero, masked_fill, move_axes_last, prepare, probabilities
from ._validation import (
    broadcast_mask,
    canonical_axes,
    check_floating,
    check_integer,
    check_nonnegative_option,
    check_reduction,
    check_shape,
    check_softcap,
    compute_dtype,
    log_base,
    static_int,
)


class Spec(NamedTuple):
    """The static options of a softmax cross-entropy (hashable: a ``nondiff_argnum``)."""

    integer_labels: bool
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    class_axis_name: Any = None


# ----------------------------------------------------------------------------------------------
# Collectives: no-ops on one device, pmax / psum over the class axis when it is sharded.


def _class_sum(x: jax.Array, spec: Spec) -> jax.Array:
    return x if spec.class_axis_name is None else lax.psum(x, spec.class_axis_name)


def _class_max(x: jax.Array, spec: Spec) -> jax.Array:
    return x if spec.class_axis_name is None else lax.pmax(x, spec.class_axis_name)


def _class_shards(spec: Spec) -> int:
    return 1 if spec.class_axis_name is None else lax.axis_size(spec.class_axis_name)


def _class_offset(num_local: int, spec: Spec):
    """Global id of the first local class: shard i holds the contiguous slice i*K_local + [0, K_local)."""
    if spec.class_axis_name is None:
        return 0
    return lax.axis_index(spec.class_axis_name) * num_local


def _class_ids(num_local: int, spec: Spec, columns=None) -> jax.Array:
    """Global ids of the ``num_local`` classes held: all the local ones, or with ``columns =
    (start, total)`` the local classes ``[start, start + num_local)`` of ``total``."""
    if columns is None:
        return lax.iota(jnp.int32, num_local) + _class_offset(num_local, spec)
    start, total = columns
    return lax.iota(jnp.int32, num_local) + (start + _class_offset(total, spec))


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax >= 0.9 names it aval.mat.varying, earlier aval.vma
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def check_varying(opts: "Options", class_operand, batch_operand) -> None:
    """Raise unless the operands vary over the mesh axes named for the classes and the batch.

    Inside ``shard_map`` with ``check_vma=False`` JAX tracks no varying axes, and the
    gradients (summed over the shards of an operand replicated on an axis, see ``sum_like``)
    would be silently wrong; an operand replicated on the axis said to split it is a mistake
    too. Outside ``shard_map`` no axis is named and nothing is checked.
    """
    named = (("class_axis_name", opts.spec.class_axis_name, class_operand),
             ("batch_axis_name", opts.batch_axis_name, batch_operand))
    for option, axis, (operand_name, operand) in named:
        if axis is not None and axis not in varying_axes(operand):
            raise ValueError(
                f"{option}={axis!r}, but {operand_name} does not vary over mesh axis {axis!r} "
                f"(it varies over {sorted(varying_axes(operand))}): call jaxce inside "
                "jax.shard_map with check_vma=True (the default), with the operand sharded "
                f"over {axis!r}"
            )


def vary_over(x, axes):
    """``x`` cast to also vary over the mesh ``axes`` (inside ``shard_map``; a no-op without)."""
    if not axes:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, tuple(axes), to="varying")
    return lax.pvary(x, tuple(axes))  # jax < 0.9


def sum_like(cotangent, primal):
    """A custom VJP's cotangent, summed over the mesh axes its primal is replicated on.

    Inside ``shard_map`` a gradient accumulated over the local rows (class weights, ``w``)
    varies over the batch axis while its input does not: its gradient is the sum over shards.
    """
    if cotangent is None:
        return None
    axes = tuple(varying_axes(cotangent) - varying_axes(primal))
    return lax.psum(cotangent, axes) if axes else cotangent


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
    ``_unless_impossible``).
    """
    if x.dtype == jnp.uint16:  # the bits of bfloat16 values
        return lax.bitcast_convert_type(x.astype(jnp.uint32) << 16, jnp.float32)
    if x.dtype == jnp.bfloat16:
        return upcast_unshared(lax.bitcast_convert_type(x, jnp.uint16))
    return x.astype(compute_dtype(x.dtype))


def softcap(z: jax.Array, spec: Spec) -> jax.Array:
    r""":math:`c \tanh(z / c)` (Gemma 2's logit soft-capping), or ``z`` when no cap is set."""
    c = spec.logit_softcap
    return z if c is None else c * jnp.tanh(z / c)


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
# upcast bf16 operand would be written out in float32).


def _possible_indicator(z):
    """1 for a logit above -inf, 0 for -inf, as ``min(exp(z - lowest), 1)``: no compare.

    Piecewise constant, so its gradient is 0 (and never inf * 0 from the overflowing exp).
    """
    lowest = jnp.finfo(z.dtype).min
    return lax.stop_gradient(jnp.minimum(jnp.exp(z - lowest), 1.0))


def _finite_gap(t, z, shift):
    """``sum_k t_k (c - z_k)``, reading a -inf logit as a finite one: exact where t_k = 0 there.

    The halves ``c/2 - max(z, lowest)/2`` are finite for every pair, so a zero target on an
    impossible class gives 0, not 0 * inf; doubling the sum overflows to +inf exactly when
    the full-scale sum would (halving and doubling are exact in binary floating point).
    """
    half = 0.5 * shift[..., None] - 0.5 * jnp.maximum(z, jnp.finfo(z.dtype).min)
    return 2.0 * jnp.sum(t * half, axis=-1)


def _exact_gap(t, z, shift):
    """``sum_k xdiff(t_k, c, z_k)`` without selects: +inf where a target t_k > 0 meets -inf."""
    lost = jnp.sum(t * (1.0 - _possible_indicator(z)), axis=-1)  # mass on impossible classes
    return jnp.where(lost > 0, jnp.inf, _finite_gap(t, z, shift))


def _if_all_finite(check, fast, exact):
    """``fast()`` if all of ``check`` is finite, else ``exact()``.

    Under ``shard_map`` both branches must vary over the same mesh axes: ``fast`` builds its
    constants from data (``0 * x + K``), not with ``jnp.full``.
    """
    return lax.cond(jnp.all(jnp.isfinite(check)), fast, exact)


def _no_impossible(raw):
    """Whether no logit of ``raw`` is -inf: a min in their own dtype (True when empty)."""
    return jnp.min(raw, initial=jnp.inf) > -jnp.inf


def _unless_impossible(raw, fast, exact, spec: Spec):
    """``fast()`` if no logit of ``raw`` is -inf, else ``exact()``; both build from raw inputs.

    float32 logits without a softcap: ``fast()`` runs first, and its results are the test (a
    -inf logit makes the fast sums infinite or NaN), at no cost. Otherwise the test is a min of
    the raw logits (the softcap maps -inf to the finite -c, so the sums cannot tell), and
    ``fast()`` runs inside the cond: for bfloat16 / float16 its upcast of the logits is then its
    own, where XLA:CPU merges equal upcasts and writes one feeding two reductions out whole as
    a float32 copy (twice the logits' size, and its page faults on every call).
    """
    if not _low_precision(raw) and spec.logit_softcap is None:
        value = fast()
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(value)]))
        return lax.cond(finite, lambda: value, exact)
    return lax.cond(_no_impossible(raw), fast, exact)


def _low_precision(raw) -> bool:
    return raw.dtype != compute_dtype(raw.dtype)


def _in_row_blocks(fn, raw, *rows, blocked: bool = True):
    """``fn(raw, *rows)`` computed over blocks of rows with ``lax.map``: for the exact sums.

    ``raw`` is [..., K]; each of ``rows`` (or None) has the same leading batch shape; ``fn``
    maps them to arrays of the batch shape. A low-precision upcast feeding several
    reductions is written out whole (see ``upcast_unshared``), and so is a select (a masked
    or softcapped logit) feeding several; in blocks, that scratch is one block's (at most
    4 MiB of float32), not the logits' size. bfloat16 blocks enter as bits and are upcast by
    them: XLA turns the converts of the blocks into one convert of the whole array before the
    loop. ``blocked=False`` computes ``fn`` on the whole batch at once (the caller knows it
    shares no upcast or select).
    """
    if not blocked:
        return fn(raw, *rows)
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


def _count_possible(raw, mask, class_weights, spec: Spec):
    """``(K_m, W_m)``: the number and total weight of each row's possible classes (all shards).

    Without a mask: K and sum(w) when no logit is -inf (a min pass tests it, no count);
    otherwise, under a cond, sums of the arithmetic indicator (a count of compares would be
    written out as [N, K]). With a mask: the sums of the mask of possible classes.
    """
    dtype = compute_dtype(raw.dtype)
    w = jnp.ones(raw.shape[-1:], dtype) if class_weights is None else class_weights

    def sums(raw, mask):
        m = (possible_classes(raw, mask).astype(dtype) if mask is not None
             else _possible_indicator(raw.astype(dtype)))
        return jnp.sum(m, axis=-1), jnp.sum(w * m, axis=-1)

    if mask is not None:
        counts = sums(raw, mask)
    else:
        first = upcast_unshared(raw[..., 0])  # (a row vector from data, see _if_all_finite)
        counts = lax.cond(
            _no_impossible(raw),
            lambda: (0.0 * first + raw.shape[-1], 0.0 * first + jnp.sum(w)),
            lambda: _in_row_blocks(lambda raw: sums(raw, None), raw, blocked=_low_precision(raw)),
        )
    return tuple(_class_sum(c, spec) for c in counts)


def _capped(raw, mask, spec: Spec):
    """The softcapped logits with impossible classes at -inf, in the compute dtype.

    Without a mask or cap this is just the upcast: a -inf logit already is -inf, and no
    select is built (it would be written out before each reduction).
    """
    z = softcap(raw.astype(compute_dtype(raw.dtype)), spec)
    if mask is None and spec.logit_softcap is None:
        return z
    return masked_fill(z, possible_classes(raw, mask))


def _targets(labels, mask, possible, class_weights, spec: Spec, dtype, num_possible, columns=None):
    """``(u, t)``: the smoothed labels u and the weighted targets t = w * u.

    Soft labels are masked by the user's ``mask`` (masked entries take no part, as in optax);
    an integer label is never masked away, so a label on a masked or -inf class meets a -inf
    logit and gives +inf (probability 0), not a silent 0.
    """
    if spec.integer_labels:
        u = (_class_ids(possible.shape[-1], spec, columns) == labels[..., None]).astype(dtype)
    else:
        u = masked_fill(labels.astype(dtype), mask, 0.0)
    eps = spec.label_smoothing
    if eps:  # K_m (num_possible) comes from the forward pass: no recount
        share = eps / jnp.maximum(num_possible, 1.0)[..., None]
        u = (1.0 - eps) * u + jnp.where(possible, share, 0.0)
    t = u if class_weights is None else u * class_weights
    return u, t


class Normalizer(NamedTuple):
    """Each row's log-normaliser, kept in two parts so that no precision is lost.

    :math:`\\operatorname{lse}(z) = c + \\log s` with a finite per-row shift :math:`c` and
    :math:`s = \\sum_k e^{z_k - c}`: the row's maximum (soft labels), or the label's logit
    (integer labels, where :math:`\\log s` is then the loss itself). For logits near 1e4
    (or 3e38) the sum ``c + log s`` rounds away most of ``log s``; probabilities formed as
    ``exp((z - c) - log s)`` keep it.
    """

    shift: jax.Array
    log_sum: jax.Array

    @property
    def lse(self) -> jax.Array:
        return self.shift + self.log_sum

    def log_probs(self, z: jax.Array) -> jax.Array:
        """``log p = (z - c) - log s`` for -inf-masked logits ``z`` [..., K].

        ``z + (-c)`` is ``z - c`` exactly; so written, it is not the forward's broadcast of c,
        which XLA:CPU would otherwise share and write out as [N, K] instead of fusing it into
        the logsumexp reduction.
        """
        return (z + (-self.shift)[..., None]) - finite_or_zero(self.log_sum)[..., None]


class RowStats(NamedTuple):
    """Per-example results of the forward pass (all of the batch shape)."""

    loss: jax.Array  # sum_k t_k (lse - z_k) + z_loss * lse**2, in nats
    normalizer: Normalizer
    target_mass: jax.Array  # T = sum_k t_k
    num_possible: jax.Array  # K_m with label smoothing (0 without: unused)
    correct: jax.Array  # 1.0 where the label's logit is the largest (integer labels)

    @property
    def logsumexp(self) -> jax.Array:
        return self.normalizer.lse


def _shifted_normalizer(z, shift, spec: Spec) -> Normalizer:
    """:math:`\\log \\sum_k e^{z_k - c}` of -inf-masked logits ``z`` for a finite shift c (all shards)."""
    log_sum = jnp.log(_class_sum(jnp.sum(jnp.exp(z - shift[..., None]), axis=-1), spec))
    return Normalizer(shift, log_sum)


def _row_max(raw, z, mask, spec: Spec) -> jax.Array:
    """Each row's largest (capped, masked) logit over all shards; -inf for an empty row."""
    if mask is None and spec.logit_softcap is None:
        # The max of the raw dtype is exact; taken before the upcast, XLA fuses the upcast into
        # each pass instead of writing an upcast copy of the (bf16) logits.
        return _class_max(jnp.max(raw, axis=-1).astype(z.dtype), spec)
    return _class_max(jnp.max(z, axis=-1), spec)


def _peak_shift(top):
    """The row maximum as a shift: 0 for an empty row (log_sum is then -inf). A +inf logit
    makes the row NaN (inf - inf), as documented, rather than a finite number."""
    return jnp.where(top == -jnp.inf, 0.0, top)


def _label_normalizer(raw, z, label_logit, mask, spec: Spec) -> Normalizer:
    """The normaliser shifted by the label's logit: one pass over the logits, no max pass.

    :math:`s = \\sum_k e^{z_k - z_y} \\ge 1` (the label's own term is 1), so
    :math:`\\log s = \\operatorname{lse}(z) - z_y` is the plain loss, non-negative and as
    precise as the max-shifted form. It is exact while every :math:`e^{z_k - z_y}` is finite,
    i.e. the label's logit is within ~88 (float32) of the row's maximum; a batch with a row
    beyond that, or without a finite label logit (ignored, out-of-range or impossible labels
    use the shift 0), falls back under a ``lax.cond`` to the max-shifted normaliser, which
    rebuilds the logits from the raw input (a cond operand is materialised) in row blocks.
    """
    fast = _shifted_normalizer(z, jnp.where(jnp.isfinite(label_logit), label_logit, 0.0), spec)

    def by_peak(raw, rows_mask):
        block_mask = mask if class_mask else rows_mask
        capped = _capped(raw, block_mask, spec)
        peak = _peak_shift(_row_max(raw, capped, block_mask, spec))
        return tuple(_shifted_normalizer(capped, peak, spec))

    class_mask = mask is not None and mask.ndim < raw.ndim  # the fused loss's [V]: not in rows
    selects = mask is not None or spec.logit_softcap is not None
    rows = None if class_mask else mask
    exact = lambda: Normalizer(*_in_row_blocks(by_peak, raw, rows, blocked=selects))
    return _if_all_finite(fast.log_sum, lambda: fast, exact)


def _label_lookup(values, labels, spec: Spec, upcast=None):
    """``(values[..., label], held)``: an O(N) gather from the local slice, summed over shards.

    ``values`` is [..., K_local] (or [K_local]); ``held`` counts the shards holding the label
    (0 for a label outside [0, K)). Shards that do not hold it contribute 0. ``upcast`` maps
    the gathered values (before the sum over shards).
    """
    num_local = values.shape[-1]
    local = labels - _class_offset(num_local, spec)
    held = (local >= 0) & (local < num_local)
    index = jnp.clip(local, 0, num_local - 1)
    if values.ndim == 1:
        picked = jnp.take(values, index)
    else:
        picked = jnp.take_along_axis(values, index[..., None], axis=-1)[..., 0]
    if upcast is not None:
        picked = upcast(picked)
    picked = jnp.where(held, picked, jnp.zeros((), picked.dtype))
    return _class_sum(picked, spec), _class_sum(held.astype(jnp.int32), spec)


def _smoothing_sums(raw, z, mask, class_weights, shift, spec: Spec):
    """``(K_m, sum_k w_k m_k, sum_k w_k m_k (c - z_k))`` over the possible classes m (local).

    Without a mask or cap, one fused pass ``sum_k w_k (c - z_k)`` is exact when no row holds
    a -inf logit (then m = 1 and K_m = K); only otherwise the select-free sums run, under a
    cond. With a mask or cap, the select form (``z`` are the capped, -inf-masked logits).
    """
    dtype = z.dtype
    w = jnp.ones(z.shape[-1:], dtype) if class_weights is None else class_weights
    if mask is not None or spec.logit_softcap is not None:
        possible = possible_classes(raw, mask)
        wm = w * possible.astype(dtype)
        gap = jnp.sum(xdiff(wm, shift[..., None], z), axis=-1)
        return jnp.sum(possible, axis=-1, dtype=dtype), jnp.sum(wm, axis=-1), gap

    def all_possible():
        gap = jnp.sum(w * (shift[..., None] - raw.astype(dtype)), axis=-1)
        zero = 0.0 * gap  # (a row vector from data, see _if_all_finite)
        return zero + z.shape[-1], zero + jnp.sum(w), gap

    def sums(raw, shift):
        zf = raw.astype(dtype)
        m = _possible_indicator(zf)
        return jnp.sum(m, axis=-1), jnp.sum(w * m, axis=-1), _finite_gap(w * m, zf, shift)

    exact = lambda: _in_row_blocks(sums, raw, shift, blocked=_low_precision(raw))
    return _unless_impossible(raw, all_possible, exact, spec)


def _label_logit(raw, labels, mask, spec: Spec):
    """``(z_y, found)``: the label's capped logit (-inf on an impossible class), O(N).

    Gathered from the raw logits and capped / masked afterwards, so that the capped, masked
    [N, K] logits need not be materialised for the gather. ``found`` counts the classes
    matching the label: 0 for a label outside [0, K), whose logit is then -inf.
    """
    # bfloat16 logits are gathered as bits (see upcast_unshared).
    values = lax.bitcast_convert_type(raw, jnp.uint16) if raw.dtype == jnp.bfloat16 else raw
    raw_label_logit, found = _label_lookup(values, labels, spec, upcast_unshared)
    label_possible = (raw_label_logit > -jnp.inf) & (found == 1)
    if mask is not None:
        label_possible &= _label_lookup(mask.astype(jnp.int32), labels, spec)[0] > 0
    return jnp.where(label_possible, softcap(raw_label_logit, spec), -jnp.inf), found


def _integer_terms(raw, z, labels, mask, class_weights, label_logit, found, shift, spec: Spec):
    """``(T, sum_k t_k (c - z_k), K_m)`` for integer labels and the normaliser's shift c.

    O(N) but for label smoothing (K_m is None without it). With :math:`b = (1 - \\varepsilon) w_y` and :math:`e = \\varepsilon / K_m`:
    :math:`T = b + e \\sum_k w_k m_k` and the gap is
    :math:`b (c - z_y) + e \\sum_k w_k m_k (c - z_k)`; only the smoothing needs class sums.
    """
    weight = 1.0 if class_weights is None else _label_lookup(class_weights, labels, spec)[0]
    # b = 0 for a label outside [0, K), as the iota comparison of the backward pass finds no class.
    b = jnp.where(found == 1, (1.0 - spec.label_smoothing) * weight, 0.0)
    # b * (c - z_y): 0 for a label of weight 0, +inf for a label on an impossible class.
    mass, gap, num_possible = b, xdiff(b, shift, label_logit), None
    if spec.label_smoothing:
        sums = _smoothing_sums(raw, z, mask, class_weights, shift, spec)
        num_possible, weight_sum, spread = (_class_sum(x, spec) for x in sums)
        e = spec.label_smoothing / jnp.maximum(num_possible, 1.0)
        mass = mass + e * weight_sum
        gap = gap + e * spread
    return mass, gap, num_possible


def _soft_terms(raw, labels, mask, class_weights, top, normalizer, spec: Spec):
    """``(T, sum_k t_k (M - z_k), K_m)`` for label distributions (K_m None without smoothing).

    The plain product ``t (M - z)`` is one fused pass, exact when no logit is -inf; otherwise
    (and with a mask, which sets logits to -inf) the select-free exact gap: 0 where t_k = 0
    even if z_k = -inf, +inf where a target puts mass on an impossible class. ``top`` (the
    max) rather than the normaliser's shift is a broadcast the logsumexp pass does not share,
    so XLA fuses it instead of writing it out. The targets are rebuilt from the raw inputs in
    each branch (the cond's operands stay the raw inputs); the fast branch (no mask, no -inf
    logit) knows every class is possible and needs no compare. :math:`T = (1 - \\varepsilon) \\sum_k w_k y_k +
    \\varepsilon W_m / K_m` needs none either.
    """
    dtype = compute_dtype(raw.dtype)
    eps = spec.label_smoothing
    w = 1.0 if class_weights is None else class_weights
    num_possible = weight_possible = None
    if eps:
        num_possible, weight_possible = _count_possible(raw, mask, class_weights, spec)

    def exact_gap(raw, labels, mask, shift, num_possible):
        possible = possible_classes(raw, mask)
        t = _targets(labels, mask, possible, class_weights, spec, dtype, num_possible)[1]
        return _exact_gap(t, _capped(raw, mask, spec), shift)

    def fast():
        # Every class is possible here: the smoothing's term is eps / K sum_k w_k (M - z_k),
        # a sum of its own (its targets, shared with the backward pass, would be written out).
        z = softcap(raw.astype(dtype), spec)
        gap = jnp.sum(w * labels.astype(dtype) * (top[..., None] - z), axis=-1)
        if not eps:
            return gap
        spread = -jnp.sum(w * (z - top[..., None]), axis=-1)  # (not the broadcast above)
        return (1.0 - eps) * gap + eps * spread / jnp.maximum(num_possible, 1.0)

    selects = mask is None and (bool(eps) or spec.logit_softcap is not None)
    exact = lambda: _in_row_blocks(
        exact_gap, raw, labels, mask, normalizer.shift, num_possible,
        blocked=_low_precision(raw) or selects,
    )
    gap = exact() if mask is not None else _unless_impossible(raw, fast, exact, spec)
    mass = _class_sum(jnp.sum(w * masked_fill(labels.astype(dtype), mask, 0.0), axis=-1), spec)
    if eps:
        mass = (1.0 - eps) * mass + eps * weight_possible / jnp.maximum(num_possible, 1.0)
    return mass, _class_sum(gap, spec), num_possible


def z_loss_term(lse, spec: Spec) -> jax.Array:
    r""":math:`\lambda_z \operatorname{lse}^2`; 0 without z-loss (0 * lse**2 would be NaN for
    |lse| > 1.8e19 in float32) and for rows without a possible class (lse = -inf)."""
    if not spec.z_loss:
        return jnp.zeros_like(lse)
    return spec.z_loss * finite_or_zero(lse) ** 2


def row_stats(z, labels, mask, class_weights, spec: Spec) -> RowStats:
    """Forward pass on raw logits ``z`` [..., K_local] (any float dtype): loss, lse, T, correct.

    Integer labels shift the normaliser by the label's logit (one pass over the logits; the
    max pass behind ``correct`` is dropped by XLA unless ``correct`` is used); label
    distributions shift it by the row maximum.
    """
    raw, z = z, _capped(z, mask, spec)
    top = _row_max(raw, z, mask, spec)
    if spec.integer_labels:
        label_logit, found = _label_logit(raw, labels, mask, spec)
        normalizer = _label_normalizer(raw, z, label_logit, mask, spec)
        target_mass, gap, num_possible = _integer_terms(
            raw, z, labels, mask, class_weights, label_logit, found, normalizer.shift, spec
        )
        correct = ((label_logit >= top) & (label_logit > -jnp.inf)).astype(z.dtype)
    else:
        normalizer = _shifted_normalizer(z, _peak_shift(top), spec)
        target_mass, gap, num_possible = _soft_terms(
            raw, labels, mask, class_weights, top, normalizer, spec
        )
        correct = jnp.zeros_like(top)
    loss = target_mass * normalizer.log_sum + gap
    # A row with no possible class (all -inf): any target mass is on impossible classes, +inf
    # (log_sum -inf meets a gap of +inf there: NaN).
    empty = normalizer.log_sum == -jnp.inf
    loss = jnp.where(empty, jnp.where(target_mass > 0, jnp.inf, 0.0), loss)
    if spec.z_loss:
        loss = loss + z_loss_term(normalizer.lse, spec)
    if spec.integer_labels:
        # A label outside [0, K) has no class: NaN, never a silent wrap to another class.
        loss = jnp.where(found == 1, loss, jnp.nan)
    if num_possible is None:
        num_possible = jnp.zeros_like(target_mass)
    return RowStats(loss, normalizer, target_mass, num_possible, correct)


def row_cotangents(
    z, labels, mask, class_weights, normalizer, target_mass, num_possible, g_loss, g_lse, spec: Spec,
    *, columns=None,
):
    r"""Backward pass: ``(dz, dlabels, dclass_weights)`` from the closed form.

    Every class's cotangent needs only its own logit and the row's saved statistics, so ``z``
    may hold a slice of the (local) classes: ``columns = (start, total)`` says it holds
    ``[start, start + K)`` of ``total`` (``mask`` and ``class_weights`` are then sliced alike).

    .. math:: dz_k = p_k \big(g (T + 2 \lambda_z \ell) + g_\ell\big) - g\, t_k,

    times the softcap's derivative :math:`1 - (z'_k / c)^2`; impossible classes get 0.
    ``dlabels`` (soft labels) is :math:`-g (1 - \varepsilon) w \log p` (0 where masked);
    ``dclass_weights`` is :math:`-\sum_n g\, u \log p`, summed over the rows of this block.
    The target t of integer labels comes from comparing an iota with the labels: no one-hot.
    """
    possible = possible_classes(z, mask)
    capped = masked_fill(softcap(z, spec), possible)
    u, t = _targets(labels, mask, possible, class_weights, spec, z.dtype, num_possible, columns)
    log_p = normalizer.log_probs(capped)
    lse = finite_or_zero(normalizer.lse)
    coef = g_loss * (target_mass + 2.0 * spec.z_loss * lse) + g_lse
    if spec.integer_labels:
        # A label outside [0, K) has a NaN loss, and so a NaN gradient (ignored labels are 0).
        num_classes = (z.shape[-1] if columns is None else columns[1]) * _class_shards(spec)
        valid = (labels >= 0) & (labels < num_classes)
        coef = jnp.where(valid, coef, jnp.nan)
    dz = jnp.exp(log_p) * coef[..., None] - g_loss[..., None] * t
    if spec.logit_softcap is not None:
        dz = dz * (1.0 - (capped / spec.logit_softcap) ** 2)
    dz = masked_fill(dz, possible, 0.0)
    g = g_loss[..., None]
    # -g * a * log p: exactly 0 where g * a = 0 (uncounted rows, zero targets), +inf where a
    # target meets an impossible class.
    neg_log_p = lambda a: xdiff(g * a, 0.0, log_p)
    dlabels = None
    if not spec.integer_labels:
        w = 1.0 if class_weights is None else class_weights
        scale = jnp.broadcast_to((1.0 - spec.label_smoothing) * w, z.shape)
        dlabels = neg_log_p(masked_fill(scale, mask, 0.0))
    dweights = None
    if class_weights is not None:
        dweights = jnp.sum(neg_log_p(u), axis=tuple(range(z.ndim - 1)))
    return dz, dlabels, dweights


# ----------------------------------------------------------------------------------------------
# The in-place path: a custom VJP over logits that hold every (local) class.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _rows(logits, labels, mask, class_weights, spec: Spec):
    stats = row_stats(logits, labels, mask, class_weights, spec)
    return stats.loss, stats.logsumexp, stats.correct


def _rows_fwd(logits, labels, mask, class_weights, spec):
    # The primal is recomputed here rather than by calling _rows, so that jax.hessian
    # (forward-over-reverse) can differentiate this function.
    stats = row_stats(logits, labels, mask, class_weights, spec)
    residuals = (logits, labels, mask, class_weights, *stats[1:4])
    return (stats.loss, stats.logsumexp, stats.correct), residuals


def _rows_bwd(spec, residuals, cotangents):
    logits, labels, mask, class_weights, normalizer, target_mass, num_possible = residuals
    g_loss, g_lse, _ = cotangents  # `correct` is piecewise constant: no gradient
    z = upcast_unshared(logits)
    targets = labels if spec.integer_labels else upcast_unshared(labels)
    dz, dlabels, dweights = row_cotangents(
        z, targets, mask, class_weights, normalizer, target_mass, num_possible, g_loss, g_lse, spec
    )
    if dlabels is not None:
        dlabels = sum_like(dlabels.astype(labels.dtype), labels)
    if dweights is not None:
        dweights = sum_like(dweights.astype(class_weights.dtype), class_weights)
    return sum_like(dz.astype(logits.dtype), logits), dlabels, None, dweights


_rows.defvjp(_rows_fwd, _rows_bwd)


# ----------------------------------------------------------------------------------------------
# Weighting and reduction, outside the custom VJP: autodiff covers sample weights and the
# denominator, and the custom VJP sees the per-example cotangent.


def _mean(num, den):
    """``num / den``; 0 / 0 is 0 (nothing counted), while x / 0 for x != 0 is NaN (undefined).

    x / 0 arises when the counted examples' weights sum to 0 but their losses do not (class
    weights 0 on every label, with label smoothing putting mass on other classes); its
    gradient is NaN too (``num * nan``), so value and gradient agree.
    """
    # num times a factor that depends on num only through a compare: its gradient is the
    # factor, NaN only where the mean is (a NaN in a select's untaken branch would leak).
    factor = jnp.where(den != 0, 1.0 / jnp.where(den != 0, den, 1.0), jnp.where(num == 0, 0.0, jnp.nan))
    return num * factor


def reduce_losses(
    loss, counted, norm, reduction: str, scale: float, batch_axis_name=None
) -> jax.Array:
    """Reduce per-example losses that are already 0 on the uncounted examples.

    ``norm`` is each counted example's share of the mean's denominator; ``scale`` is ln(base).
    ``batch_axis_name`` makes the sums global across a sharded batch.
    """
    if reduction == "none":
        return loss / scale
    total = jnp.sum(loss)
    if batch_axis_name is not None:
        total = lax.psum(total, batch_axis_name)
    if reduction == "sum":
        return total / scale
    den = jnp.sum(jnp.where(counted, norm, 0.0))
    if batch_axis_name is not None:
        den = lax.psum(den, batch_axis_name)
    return _mean(total, den) / scale


def label_class_weights(class_weights, labels, spec: Spec):
    """:math:`w_{y_n}` by an O(N) gather from the local slice (0 for labels outside [0, K))."""
    return _label_lookup(class_weights, labels, spec)[0]


class Options(NamedTuple):
    """Validated options shared by every softmax cross-entropy entry point."""

    spec: Spec
    scale: float
    reduction: str
    return_aux: bool
    ignore_index: int | None
    batch_axis_name: Any


def make_options(
    *,
    integer_labels: bool,
    label_smoothing,
    z_loss,
    logit_softcap,
    base,
    reduction,
    return_aux,
    ignore_index=None,
    class_axis_name=None,
    batch_axis_name=None,
) -> Options:
    check_reduction(reduction)
    ignore_index = static_int("ignore_index", ignore_index, optional=True)
    spec = Spec(
        integer_labels=integer_labels,
        label_smoothing=check_nonnegative_option("label_smoothing", label_smoothing, upper=1.0),
        z_loss=check_nonnegative_option("z_loss", z_loss),
        logit_softcap=check_softcap(logit_softcap),
        class_axis_name=class_axis_name,
    )
    return Options(spec, log_base(base), reduction, bool(return_aux), ignore_index, batch_axis_name)


def check_weights(class_weights, sample_weights, num_classes, batch_shape):
    """Validate and upcast the optional weights; class weights come back with shape (K,)."""
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights)
        check_floating("class_weights", class_weights)
        if class_weights.size != num_classes or class_weights.ndim == 0:
            raise ValueError(
                f"class_weights shape {class_weights.shape} does not match the {num_classes} classes"
            )
        class_weights = class_weights.reshape(-1).astype(compute_dtype(class_weights.dtype))
    if sample_weights is not None:
        sample_weights = jnp.asarray(sample_weights)
        check_floating("sample_weights", sample_weights)
        check_shape("sample_weights", sample_weights, batch_shape, "the batch shape")
        sample_weights = sample_weights.astype(compute_dtype(sample_weights.dtype))
    return class_weights, sample_weights


def finish(stats_loss, lse, correct, labels, counted, class_weights, sample_weights, opts: Options):
    """Apply sample weights, reduction and base; build the aux dict. Shared by every path."""
    spec = opts.spec
    # Uncounted rows take no part: their loss (NaN for an ignored label that matches no class)
    # and their sample weight (even NaN) are zeroed before they meet, so neither reaches the
    # other's gradient (the double where).
    loss = jnp.where(counted, stats_loss, 0.0)
    norm = jnp.ones_like(loss)
    if spec.integer_labels and class_weights is not None:
        norm = label_class_weights(class_weights, labels, spec)
    if sample_weights is not None:
        weights = jnp.where(counted, sample_weights, 0.0)
        loss, norm = loss * weights, norm * weights
    out = reduce_losses(loss, counted, norm, opts.reduction, opts.scale, opts.batch_axis_name)
    if not opts.return_aux:
        return out
    aux = {"logsumexp": lse, "z_loss": z_loss_term(lse, spec) / opts.scale}
    if spec.integer_labels:
        aux["correct"] = (correct > 0.5) & counted
    return out, aux


def counted_rows(mask, ignored, batch_shape, spec: Spec):
    """Examples that count: not ignored, and with at least one unmasked class (all shards)."""
    counted = jnp.ones(batch_shape, bool) if ignored is None else ~ignored
    if mask is not None:
        held = jnp.sum(mask, axis=-1, dtype=jnp.int32)
        counted = counted & (_class_sum(held, spec) > 0)
    return jnp.broadcast_to(counted, batch_shape)


_INT32 = jnp.iinfo(jnp.int32)


def integer_labels(labels, batch_shape, what: str, ignore_index: int | None):
    """Validate integer labels; return ``(ids, ignored)``: int32 class ids and the ignore mask.

    Every comparison is exact whatever the labels' dtype: K, the class offsets and
    ``ignore_index`` are never converted into a narrow dtype, where they would wrap (K = 256
    is 0 in uint8, -100 is 156). Labels that do not fit in int32 become -1, outside every
    [0, K): NaN, never another class. ``ignored`` (None without ``ignore_index``) compares
    the original labels, and is all False when ``ignore_index`` is not a value of their dtype;
    ignored examples get the id 0 (they take no part, and an id outside [0, K) would give its
    row a NaN gradient).
    With 64-bit types disabled JAX truncates int64 labels to int32 (2**32 + 1 would become
    class 1); NumPy input is checked here for that, and raises.
    """
    if isinstance(labels, (np.ndarray, np.generic)) and labels.dtype.kind in "iu":
        out_of_int32 = (labels < _INT32.min) | (labels > _INT32.max)
        if not jax.config.jax_enable_x64 and labels.dtype.itemsize == 8 and np.any(out_of_int32):
            raise ValueError(
                f"labels hold {labels[out_of_int32].flat[0]}, beyond int32, which JAX truncates "
                "to another class while 64-bit types are disabled (enable jax_enable_x64)"
            )
    labels = jnp.asarray(labels)
    check_integer("labels", labels)
    check_shape("labels", labels, batch_shape, what)
    info = jnp.iinfo(labels.dtype)
    ids = labels
    if info.max > _INT32.max or info.min < _INT32.min:
        ids = jnp.where((labels >= max(info.min, _INT32.min)) & (labels <= _INT32.max), labels, -1)
    ids = ids.astype(jnp.int32)
    ignored = None
    if ignore_index is not None:
        representable = info.min <= ignore_index <= info.max
        ignored = (labels == ignore_index) if representable else jnp.zeros(labels.shape, bool)
        ids = jnp.where(ignored, 0, ids)  # any class: their loss and gradient are zeroed
    return ids, ignored


def _check_unambiguous(where, logits_shape, batch_shape, opts: Options) -> None:
    """Inside ``shard_map`` with the classes split, refuse a mask of the batch shape that is
    also a mask of the trailing (class) shape: on one device the global shapes tell which it
    is, but the local shard's shapes may coincide (4 rows x 4 classes of 16)."""
    if where is None or opts.spec.class_axis_name is None:
        return
    shape = jnp.shape(where)
    if len(shape) < len(logits_shape) and shape == batch_shape == logits_shape[-len(shape):]:
        raise ValueError(
            f"where shape {shape} is both the local batch shape and the local class shape of "
            f"logits {logits_shape} inside shard_map: give it the logits' rank, with size-1 "
            f"axes where it does not vary (e.g. {(1,) * (len(logits_shape) - len(shape)) + shape} "
            f"for a class mask, {shape + (1,) * (len(logits_shape) - len(shape))} for an "
            "example mask with the classes last)"
        )


def _logits_in_rows(logits, axis, where, opts: Options, name="logits"):
    logits = jnp.asarray(logits)
    check_floating(name, logits)
    axes = canonical_axes(axis, logits.ndim)
    if opts.spec.class_axis_name is not None and list(axes) != sorted(axes):
        # A shard holds a contiguous slice of the flat class index only when the split (the
        # leading) class axis is also the major one of the flattening.
        raise ValueError(
            f"axis {axis} must list the class axes in increasing order with class_axis_name "
            f"(got {axes} for logits of rank {logits.ndim})"
        )
    batch_shape = tuple(d for i, d in enumerate(logits.shape) if i not in axes)
    _check_unambiguous(where, logits.shape, batch_shape, opts)
    mask = broadcast_mask(where, logits.shape, axes)
    if not all(logits.shape[a] for a in axes):
        class_shape = tuple(logits.shape[a] for a in axes)
        raise ValueError(f"{name} have no classes: axis {axis} of shape {logits.shape} is {class_shape}")
    flat = move_axes_last(logits, axes)
    return flat, (None if mask is None else move_axes_last(mask, axes)), axes, batch_shape


def _in_place_loss(
    z, labels, mask, ignored, batch_shape, class_weights, sample_weights, opts: Options
):
    """The in-place path of both softmax cross-entropies, from logits moved to [..., K]."""
    check_varying(opts, ("logits", z), ("logits", z))
    class_weights, sample_weights = check_weights(
        class_weights, sample_weights, z.shape[-1], batch_shape
    )
    loss, lse, correct = _rows(z, labels, mask, class_weights, opts.spec)
    counted = counted_rows(mask, ignored, batch_shape, opts.spec)
    return finish(loss, lse, correct, labels, counted, class_weights, sample_weights, opts)


def _with_option_doc(fn):
    """Put the options shared by both softmax cross-entropies (``_OPTION_DOC``) into ``fn``'s
    docstring at ``{options}``: a docstring must be a literal, so it cannot be concatenated."""
    fn.__doc__ = fn.__doc__.replace("{options}\n", _OPTION_DOC.lstrip("\n"))
    return fn


_OPTION_DOC = r"""
      where: boolean mask broadcastable to ``logits`` (a mask of the batch shape masks whole
        examples, as in optax). Masked classes take no part; a fully masked example has loss 0,
        gradient 0, and does not count in ``"mean"``. Inside ``shard_map`` with the classes
        split, a mask whose shape is both the local batch shape and the local class shape is
        refused as ambiguous: give it the logits' rank.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; targets become
        :math:`(1 - \varepsilon) y + \varepsilon / K` over the unmasked classes.
      class_weights: shape ``[K]``; weight :math:`w_k` multiplies class k's term.
      sample_weights: the batch shape; multiplies each example's loss.
      z_loss: :math:`\lambda_z \ge 0`; adds :math:`\lambda_z \operatorname{lse}(z)^2` per example
        (PaLM's auxiliary loss).
      logit_softcap: :math:`c \in (0, 2^{100}]`; logits pass through :math:`c \tanh(z / c)`
        first (Gemma 2); a :math:`-\infty` logit stays an impossible class.
      base: logarithm base of the loss (``None`` nats, ``2`` bits, ``10`` hartleys); loss and
        gradient are divided by :math:`\ln b`.
      reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"``: the sum divided by the
        counted examples' total weight (their sample weights, times :math:`w_{y_n}` with class
        weights and integer labels); 0 when nothing counts (0 / 0), NaN when that weight is 0
        but the sum is not (x / 0: class weights 0 on every label, with smoothing).
      return_aux: also return a dict with per-example ``logsumexp``, the ``z_loss`` term (0 for
        an example without a possible class) and (integer labels) ``correct``: whether the
        label's logit is the largest (False for an impossible or out-of-range label).
      class_axis_name: inside ``shard_map``, the mesh axis over which the class axis is split
        (each device holds a contiguous slice, in device order); the losses combine O(N)
        statistics with ``pmax``/``psum`` and give the single-device numbers. ``shard_map``
        must keep ``check_vma=True``: without it the gradients would be wrong, and the losses
        raise.
      batch_axis_name: the mesh axis over which the batch is split; ``"sum"`` and ``"mean"``
        become global.
"""


@_with_option_doc
def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    base: float | None = None,
    reduction: str = "none",
    return_aux: bool = False,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
):
    r"""Softmax cross-entropy against label distributions: :math:`-\sum_k y_k \log p_k`.

    Args:
      logits: floating logits; ``axis`` holds the K classes.
      labels: probabilities of the same shape (differentiable: distillation works).
      axis: the class axis or axes (several are flattened, C order, in the order given).
{options}
    Returns:
      The loss in float32 (or wider): per example (the batch shape) or a scalar; with
      ``return_aux`` the pair ``(loss, aux)``.

    Note:
      The backward pass is the closed form :math:`g (p \sum_k y_k - y)` for the logits and
      :math:`-g \log p` for the labels, from a custom VJP that keeps only the logits, the
      labels and the logsumexp. A :math:`-\infty` logit whose label is 0 gives a finite loss
      and zero gradient (optax gives NaN there); a :math:`+\infty` logit gives NaN.
      bf16/f16 logits are computed in float32; the gradient has the logits' dtype.
      Forward mode (``jax.jvp``, ``jax.jacfwd``) is not defined for a custom VJP and raises
      JAX's error; use reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``);
      ``jax.hessian`` (forward over reverse) works.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([2.0, 1.0, 0.0])
      >>> print(jaxce.softmax_cross_entropy(logits, jnp.array([1.0, 0.0, 0.0])))
      0.407606
      >>> print(jaxce.softmax_cross_entropy(logits, jnp.array([1.0, 0.0, 0.0]), base=10))
      0.177021
    """
    opts = make_options(
        integer_labels=False,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        base=base,
        reduction=reduction,
        return_aux=return_aux,
        class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name,
    )
    logits_in = jnp.asarray(logits)
    z, mask, axes, batch_shape = _logits_in_rows(logits_in, axis, where, opts)
    labels = jnp.asarray(labels)
    check_floating("labels", labels)
    check_shape("labels", labels, logits_in.shape, "logits shape")
    mesh_axes = dict(class_axis_name=class_axis_name, batch_axis_name=batch_axis_name)
    check_finite("logits", logits_in, axes, where=where, **mesh_axes)
    check_distribution("labels", labels, axes, where=where, **mesh_axes)
    y = move_axes_last(labels, axes)
    return _in_place_loss(z, y, mask, None, batch_shape, class_weights, sample_weights, opts)


@_with_option_doc
def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    base: float | None = None,
    reduction: str = "none",
    return_aux: bool = False,
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
):
    r"""Softmax cross-entropy against integer labels: :math:`\operatorname{lse}(z) - z_y`.

    Args:
      logits: floating logits; ``axis`` holds the K classes.
      labels: integer class ids of the batch shape (the logits' shape without ``axis``; with
        several class axes, a flat C-order index into them in the order ``axis`` lists them,
        as optax: ``axis=(3, 2)`` makes axis 3 the major one).
      axis: the class axis or axes.
      ignore_index: examples whose label equals it get loss 0 and gradient 0, and do not
        count in ``"mean"``.
{options}
    Returns:
      The loss in float32 (or wider): per example or a scalar; with ``return_aux`` the pair
      ``(loss, aux)``. With ``class_weights`` and ``"mean"`` the mean divides by the sum of
      the counted examples' :math:`w_{y_n}` (times their sample weights): PyTorch's semantics.

    Note:
      The backward pass is :math:`g (p - t)` from a custom VJP, the target t built by comparing
      an iota with the labels (no one-hot). Labels of any integer dtype are compared
      exactly (K and ``ignore_index`` never wrap in a narrow dtype); int64 NumPy labels beyond
      int32 raise while 64-bit types are disabled (JAX would truncate them). A label outside
      ``[0, K)`` that is not ``ignore_index`` gives a NaN loss and a NaN gradient row (never
      a silent wrap to another class; :func:`jaxce.checked` raises instead); a label on a
      masked class or a :math:`-\infty` logit, or in a row whose logits are all
      :math:`-\infty`, has probability 0 and gives :math:`+\infty` (gradient 0). A
      :math:`-\infty` logit is an impossible class, treated like a masked one: label
      smoothing puts no mass on it.
      Forward mode (``jax.jvp``, ``jax.jacfwd``) is not defined for a custom VJP and raises
      JAX's error; use reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``);
      ``jax.hessian`` (forward over reverse) works.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
      >>> print(jaxce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])).round(5))
      [0.40761 1.40761]
      >>> print(jaxce.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, reduction="mean"))
      0.407606
    """
    opts = make_options(
        integer_labels=True,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        base=base,
        reduction=reduction,
        return_aux=return_aux,
        ignore_index=ignore_index,
        class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name,
    )
    z, mask, axes, batch_shape = _logits_in_rows(logits, axis, where, opts)
    what = f"logits shape without axis {axis}"
    ids, ignored = integer_labels(labels, batch_shape, what, opts.ignore_index)
    check_finite(
        "logits", logits, axes, where=where,
        class_axis_name=class_axis_name, batch_axis_name=batch_axis_name,
    )
    check_labels(
        labels, z.shape[-1], ignore_index=opts.ignore_index, class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name,
    )
    return _in_place_loss(z, ids, mask, ignored, batch_shape, class_weights, sample_weights, opts)


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
    base: float | None = None,
) -> jax.Array:
    r"""Negative log-likelihood on log-probabilities: :math:`-w_y \log p_y`.

    The notes' "log-likelihood" objective (PyTorch's ``nll_loss``):
    ``nll_loss(log_softmax(z), y)`` equals
    :func:`softmax_cross_entropy_with_integer_labels` for every option they share.

    Args:
      log_probs: floating log-probabilities; ``axis`` holds the K classes.
      labels: integer class ids of the batch shape.
      axis, where, ignore_index, class_weights, sample_weights, reduction, base: as in
        :func:`softmax_cross_entropy_with_integer_labels`.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> log_p = jnp.log(jnp.array([[0.0508, 0.9492], [0.8360, 0.1640]]))
      >>> print(jaxce.nll_loss(log_p, jnp.array([0, 0]), base=2))
      [4.2990 0.2584]
    """
    opts = make_options(
        integer_labels=True,
        label_smoothing=0.0,
        z_loss=0.0,
        logit_softcap=None,
        base=base,
        reduction=reduction,
        return_aux=False,
        ignore_index=ignore_index,
    )
    lp, mask, _, batch_shape = _logits_in_rows(log_probs, axis, where, opts, name="log_probs")
    what = f"log_probs shape without axis {axis}"
    ids, ignored = integer_labels(labels, batch_shape, what, opts.ignore_index)
    check_distribution("log_probs", log_probs, axis, where=where, log=True)
    check_labels(labels, lp.shape[-1], ignore_index=opts.ignore_index)
    class_weights, sample_weights = check_weights(
        class_weights, sample_weights, lp.shape[-1], batch_shape
    )
    lp = masked_fill(lp.astype(compute_dtype(lp.dtype)), mask)
    num_classes = lp.shape[-1]
    picked = jnp.take_along_axis(lp, jnp.clip(ids, 0, num_classes - 1)[..., None], axis=-1)
    counted = counted_rows(mask, ignored, batch_shape, opts.spec)
    found = (ids >= 0) & (ids < num_classes)
    # (An uncounted row's -inf must not meet the class weights' zero cotangent: NaN.)
    picked = jnp.where(counted, picked[..., 0], 0.0)
    # A counted label outside [0, K): NaN loss and a NaN gradient on its row's classes, from
    # a term that is exactly 0 (with a zero gradient) on every other row.
    undefined = jnp.where(found | ~counted, 0.0, jnp.nan)
    loss = undefined * jnp.sum(finite_or_zero(lp), axis=-1) - picked
    if class_weights is not None:
        loss = loss * label_class_weights(class_weights, ids, opts.spec)
    return finish(loss, None, None, ids, counted, class_weights, sample_weights, opts)


@jax.custom_vjp
def _binary_cross_entropy(z, y, pos_weight):
    return _binary_cross_entropy_fwd(z, y, pos_weight)[0]


def _nonzero_times(a, x):
    # a * x, exactly 0 where a == 0 even when x is infinite (a weight of 0 removes the term).
    return jnp.where(a != 0, a * jnp.where(a != 0, x, 0.0), 0.0)


def _binary_cross_entropy_fwd(z, y, pos_weight):
    # pos_weight * y * softplus(-z) + (1 - y) * softplus(z): -log(sigmoid) and -log(1 - sigmoid)
    # without forming the sigmoid; finite for any z with labels that put no mass on the
    # impossible side (z = +inf, y = 1 gives 0).
    loss = _nonzero_times(pos_weight * y, jax.nn.softplus(-z)) + _nonzero_times(
        1.0 - y, jax.nn.softplus(z)
    )
    return loss, (z, y, pos_weight)


def _binary_cross_entropy_bwd(residuals, g):
    z, y, pos_weight = residuals
    a = pos_weight * y
    dz = g * (jax.nn.sigmoid(z) * (a + 1.0 - y) - a)
    dy = _nonzero_times(g, pos_weight * jax.nn.softplus(-z) - jax.nn.softplus(z))
    dpos = _nonzero_times(g, _nonzero_times(y, jax.nn.softplus(-z)))
    return dz, dy, dpos


_binary_cross_entropy.defvjp(_binary_cross_entropy_fwd, _binary_cross_entropy_bwd)


def _broadcast_operand(name, x, shape, dtype, mask):
    """``x`` checked, cast to ``dtype``, broadcast to ``shape``, and 0 where ``mask`` is False."""
    x = jnp.asarray(x)
    check_floating(name, x)
    try:
        x = jnp.broadcast_to(x.astype(dtype), shape)
    except ValueError:
        raise ValueError(f"{name} shape {x.shape} is not broadcastable to logits shape {shape}") from None
    return masked_fill(x, mask, 0.0)


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    base: float | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Binary cross-entropy of a sigmoid, elementwise (also multi-label: one sigmoid per class).

    .. math::
        e = -\big(\beta\, y \log \sigma(z) + (1 - y) \log(1 - \sigma(z))\big),
        \qquad \frac{\partial e}{\partial z} = \sigma(z) (\beta y + 1 - y) - \beta y

    which is :math:`\sigma(z) - y` for :math:`\beta = 1`: the sigmoid's derivative cancels, so
    a confidently wrong prediction still learns fast (REFERENCE.md section 4).

    Args:
      logits: floating logits.
      labels: targets in [0, 1], broadcastable to ``logits`` (differentiable).
      where: boolean mask broadcastable to ``logits``; masked elements give 0 and do not count,
        whatever any operand holds there (NaN, inf): their gradients are 0.
      pos_weight: :math:`\beta`, the weight of the positive term (PyTorch's ``pos_weight``),
        broadcastable to ``logits`` (e.g. one per class).
      sample_weights: broadcastable to ``logits``; multiplies each element's loss.
      label_smoothing: :math:`\varepsilon \in [0, 1)`; labels become
        :math:`(1 - \varepsilon) y + \varepsilon / 2`.
      base: logarithm base; loss and gradient are divided by :math:`\ln b`.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over unmasked elements, weighted).

    Returns:
      The loss in float32 (or wider), elementwise or reduced.

    Note:
      Finite for any logit, :math:`\pm\infty` included, whenever the label allows it:
      :math:`z = +\infty` with :math:`y = 1` gives loss 0 and gradient 0.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> z = jnp.log(jnp.array([0.98 / 0.02, 0.0001 / 0.9999]))  # sigmoid(z) = 0.98, 0.0001
      >>> print(jaxce.sigmoid_binary_cross_entropy(z, jnp.array([1.0, 1.0]), base=2).round(5))
      [ 0.02915 13.28771]
    """
    check_reduction(reduction)
    scale = log_base(base)
    eps = check_nonnegative_option("label_smoothing", label_smoothing, upper=1.0)
    z = jnp.asarray(logits)
    check_floating("logits", z)
    dtype = compute_dtype(z.dtype)
    y = jnp.asarray(labels)
    check_floating("labels", y)
    try:
        shape = jnp.broadcast_shapes(z.shape, y.shape)
    except ValueError:
        raise ValueError(f"labels shape {y.shape} does not broadcast with logits shape {z.shape}") from None
    mask = broadcast_mask(where, shape, ())
    # Masked elements take no part, whatever they hold (NaN, inf): every operand is zeroed there
    # before any arithmetic (the double where), so nothing they hold reaches a gradient.
    z, y = (masked_fill(jnp.broadcast_to(a.astype(dtype), shape), mask, 0.0) for a in (z, y))
    check_finite("logits", z)
    check_unit_interval("labels", y)
    if eps:
        y = (1.0 - eps) * y + eps / 2.0
    beta = jnp.ones(shape, dtype) if pos_weight is None else _broadcast_operand(
        "pos_weight", pos_weight, shape, dtype, mask
    )
    loss = _binary_cross_entropy(z, y, beta)
    counted = jnp.ones(shape, bool) if mask is None else mask
    loss = jnp.where(counted, loss, 0.0)
    norm = jnp.ones(shape, dtype)
    if sample_weights is not None:
        weights = _broadcast_operand("sample_weights", sample_weights, shape, dtype, mask)
        loss, norm = loss * weights, norm * weights
    return reduce_losses(loss, counted, norm, reduction, scale)


def softmax_cross_entropy_hvp(
    logits: ArrayLike,
    v: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Hessian-vector product of softmax cross-entropy in the logits, in O(K) memory.

    .. math:: H v = (\operatorname{diag}(p) - p p^\top) v = p \odot v - p \langle p, v \rangle

    (for labels summing to 1; the Hessian does not depend on them). It is also the Fisher /
    Gauss-Newton product for the logits. No K x K matrix is formed.

    Args:
      logits: floating logits.
      v: the vector(s), same shape as ``logits``.
      axis: the class axis or axes.
      where: boolean mask broadcastable to ``logits``; masked classes give 0.

    Returns:
      :math:`H v` of ``logits``' shape, in float32 (or wider).

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> print(jaxce.softmax_cross_entropy_hvp(jnp.zeros(2), jnp.array([1.0, 0.0])))
      [ 0.25 -0.25]
    """
    _, z, mask, axes = prepare(logits, axis, where, name="logits")
    v = jnp.asarray(v)
    check_floating("v", v)
    check_shape("v", v, z.shape, "logits shape")
    check_finite("logits", z, axes, where=where)
    p = probabilities(z, mask, axes)
    pv = p * v.astype(z.dtype)
    return pv - p * jnp.sum(pv, axis=axes, keepdims=True)
