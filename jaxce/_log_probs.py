r"""Per-example log-probabilities of labels and entropies of tempered softmaxes (the terms of
policy-gradient objectives such as GRPO's), with closed-form backward passes.

For one example with logits :math:`z`, temperature :math:`\tau` and soft-cap :math:`c`, the
capped logits are :math:`\hat z_k = c \tanh(z_k / c)` (:math:`-\infty` for an impossible
class: a masked one or a :math:`-\infty` logit) and :math:`p = \operatorname{softmax}(\hat z /
\tau)`. With the row's maximum :math:`M = \max_k \hat z_k`, :math:`q_k = (\hat z_k - M) / \tau
\le 0` and :math:`s = \sum_k e^{q_k} \ge 1`,

.. math::
    \log p_y = q_y - \log s, \qquad
    H = -\sum_k p_k \log p_k = \log s + \sum_k p_k (-q_k),

both terms of :math:`H` non-negative (no cancellation, even for logits of 1e4), and
:math:`0 \log 0 = 0` (an impossible class or an underflowing :math:`e^{q_k}` adds 0). The
gradients are

.. math::
    \frac{\partial \log p_y}{\partial z_k} = \frac{\sigma_k}{\tau} (\delta_{ky} - p_k),
    \qquad
    \frac{\partial H}{\partial z_k} = -\frac{\sigma_k}{\tau}\, p_k (\log p_k + H),

with the soft-cap's derivative :math:`\sigma_k = 1 - \tanh^2(z_k / c)` (1 without a cap), and
0 for an impossible class. Each class's cotangent needs only its own logit and the row's
saved :math:`(M, \log s, H)`: the fused path (:mod:`jaxce._linear_log_probs`) computes them a
tile of columns at a time, and a sharded class axis combines O(N) values with
``pmax``/``psum``.
"""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._normalizer import label_lookup, peak_shift, row_max
from ._options import (
    check_varying,
    counted_rows,
    example_mask,
    integer_labels,
    left_out_rows,
    logits_in_rows,
    make_options,
)
from ._row_sums import (
    in_row_blocks,
    low_precision,
    possible_classes,
    reduce_rows,
    softcap,
    summable,
    upcast_unshared,
)
from ._softmax import masked_fill
from ._spec import Spec, class_ids, class_max, class_shards, class_sum, sum_like
from ._validation import compute_dtype, static_bool, static_number
from ._value_checks import check_finite, check_labels


class LogProbSpec(NamedTuple):
    """The static options of the label log-probabilities (hashable: a ``nondiff_argnum``)."""

    spec: Spec  # the soft-cap and the class axis
    temperature: float
    entropy: bool  # whether the entropy is computed (and differentiated)


def check_temperature(temperature) -> float:
    """``temperature`` as a positive, finite Python float, or raise naming the value."""
    tau = static_number("temperature", temperature)
    if not 0.0 < tau < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {tau!r}")
    return tau


def make_log_prob_spec(temperature, logit_softcap, return_entropy, ignore_index,
                       class_axis_name, batch_axis_name=None):
    """``(options, LogProbSpec)``: the shared options validated, and the temperature."""
    opts = make_options(
        integer_labels=True,
        label_smoothing=0.0,
        z_loss=0.0,
        logit_softcap=logit_softcap,
        base=None,
        reduction="none",
        return_aux=False,
        ignore_index=ignore_index,
        class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name,
    )
    return_entropy = static_bool("return_entropy", return_entropy)
    return opts, LogProbSpec(opts.spec, check_temperature(temperature), return_entropy)


# ----------------------------------------------------------------------------------------------
# The row mathematics, on logits holding all (local) classes or, backward, a slice of them.


def _temper(x, ls: LogProbSpec):
    return x if ls.temperature == 1.0 else x / ls.temperature


def capped_logits(z, mask, ls: LogProbSpec):
    """:math:`c \\tanh(z / c)` of ``z`` (in the compute dtype), -inf where impossible. Without
    a mask or cap no select is built: a -inf logit stays -inf."""
    capped = softcap(z, ls.spec)
    if mask is None and ls.spec.logit_softcap is None:
        return capped
    return masked_fill(capped, possible_classes(z, mask))


def class_sums(z, mask, ls: LogProbSpec, in_blocks=False):
    """``(M, log s, H)`` of each row of ``z`` [..., K_local] (all shards); H is 0 without
    ``ls.entropy`` and for a row without a possible class (whose ``log s`` is -inf).

    ``M`` is the maximum of the capped logits, *before* the temperature: the differences
    :math:`(\\hat z_k - M) / \\tau` round once (a difference of nearby floats is exact), where
    :math:`\\hat z_k / \\tau - M / \\tau` would round each term at the logits' scale (logits of
    1e4 in float32). :math:`\\sum_k e^{q_k} (-q_k)` with :math:`q = (\\hat z - M) / \\tau`
    reads a -inf :math:`q_k` as the lowest finite number (``maximum``, no select):
    :math:`0 \\cdot \\log 0 = 0`.

    On a whole batch the sums go through ``reduce_rows`` (long rows in chunks on XLA:CPU), of
    the raw logits where capping does nothing. ``in_blocks`` (a block of rows of
    :func:`in_row_blocks`): whole rows of the capped logits (measured ~2.7x faster there at
    K=131072).
    """
    spec = ls.spec
    capped = capped_logits(z.astype(compute_dtype(z.dtype)), mask, ls)
    if in_blocks:
        top, summed = class_max(jnp.max(capped, axis=-1), spec), capped
    else:
        top, summed = row_max(z, capped, mask, spec), summable(z, capped, mask, spec)
    shift = peak_shift(top)  # (+inf stays: NaN, as for the losses)
    tempered = lambda x, c: _temper(x.astype(c.dtype) - c, ls)
    row_sum = functools.partial(reduce_rows, whole_rows=in_blocks)
    total = class_sum(row_sum(lambda x, c: jnp.exp(tempered(x, c)), (summed,), (shift,)), spec)
    log_sum = jnp.log(total)
    if not ls.entropy:
        return shift, log_sum, jnp.zeros_like(log_sum)
    lowest = jnp.finfo(total.dtype).min
    if in_blocks:  # the same exponentials as above: written out once per block, read twice
        surprisal_of, offset = tempered, shift
    else:  # z + (-M) is z - M exactly, but not the exponentials above, which XLA:CPU would
        # share and write out whole
        surprisal_of, offset = (lambda x, neg_c: _temper(x.astype(neg_c.dtype) + neg_c, ls)), -shift

    def surprisal_terms(x, c):
        q = surprisal_of(x, c)
        return jnp.exp(q) * -jnp.maximum(q, lowest)

    spread = class_sum(row_sum(surprisal_terms, (summed,), (offset,)), spec)
    entropy = jnp.where(total > 0, log_sum + spread / total, 0.0)
    return shift, log_sum, entropy


def label_capped_logit(values, labels, mask, ls: LogProbSpec, upcast=None):
    """``(ẑ_y, found)``: the label's capped logit (-inf on an impossible class), O(N).

    Gathered from the raw ``values`` (``upcast`` maps the gathered values; bfloat16 logits
    are gathered as bits), then capped; ``found`` counts the classes matching the label over
    all shards: 0 for a label outside [0, K).
    """
    raw, found = label_lookup(values, labels, ls.spec, upcast)
    possible = (raw > -jnp.inf) & (found == 1)
    if mask is not None:
        possible &= label_lookup(mask.astype(jnp.int32), labels, ls.spec)[0] > 0
    return jnp.where(possible, softcap(raw, ls.spec), -jnp.inf), found


def _log_sum_or_zero(log_sum):
    """``log s``, 0 for a row without a possible class (-inf), whose log-probs stay -inf."""
    return jnp.where(log_sum == -jnp.inf, 0.0, log_sum)


def label_log_prob(capped_y, found, shift, log_sum, ls: LogProbSpec):
    """:math:`\\log p_y = (\\hat z_y - M) / \\tau - \\log s`: -inf on an impossible class (also
    in a row without a possible class), NaN for a label outside [0, K)."""
    log_p = _temper(capped_y - shift, ls) - _log_sum_or_zero(log_sum)
    return jnp.where(found == 1, log_p, jnp.nan)


def label_cotangents(z, labels, mask, stats, g_log_prob, g_entropy, ls: LogProbSpec, columns=None):
    r"""``dz`` of :math:`\sum_n g_n \log p_{n y_n} + h_n H_n` in closed form.

    ``z`` [..., K] are logits in the compute dtype: every (local) class, or with ``columns =
    (start, total)`` the local classes ``[start, start + K)`` of ``total`` (``mask`` sliced
    alike). ``stats = (M, log s, H)`` are the forward's. An impossible class gets 0 (no
    :math:`0 \cdot \log 0`), and so does every class of a row whose cotangents are both 0
    (whatever its logits hold: an ignored row's junk, an overlapping block's recounted row);
    a label outside [0, K) makes its row NaN wherever its log-prob's cotangent is not 0 (its
    entropy's gradient alone stays finite).
    """
    spec = ls.spec
    shift, log_sum, entropy = stats
    capped = capped_logits(z, mask, ls)
    log_p = _temper(capped + (-shift)[..., None], ls) - _log_sum_or_zero(log_sum)[..., None]
    p = jnp.exp(log_p)
    num_classes = (z.shape[-1] if columns is None else columns[1]) * class_shards(spec)
    valid = (labels >= 0) & (labels < num_classes)
    live = (g_log_prob != 0) | (g_entropy != 0)
    g = jnp.where(valid | (g_log_prob == 0), g_log_prob, jnp.nan)[..., None]
    hit = class_ids(z.shape[-1], spec, columns) == labels[..., None]
    dzt = g * (hit.astype(z.dtype) - p)
    if ls.entropy:
        dzt = dzt - g_entropy[..., None] * (p * (log_p + entropy[..., None]))
    dz = _temper(dzt, ls)
    if spec.logit_softcap is not None:
        dz = dz * (1.0 - (capped / spec.logit_softcap) ** 2)
    return masked_fill(dz, possible_classes(z, mask) & live[..., None], 0.0)


# ----------------------------------------------------------------------------------------------
# The in-place path: a custom VJP over logits that hold every (local) class.


def _forward(logits, labels, mask, ls: LogProbSpec):
    """``(log_prob, entropy, (M, log s, H))`` of raw logits [..., K_local] (any float dtype)."""
    # bfloat16 logits are gathered as bits (see upcast_unshared).
    bf16 = logits.dtype == jnp.bfloat16
    values = lax.bitcast_convert_type(logits, jnp.uint16) if bf16 else logits
    capped_y, found = label_capped_logit(values, labels, mask, ls, upcast_unshared)
    # In blocks of rows where a select, or an upcast feeding both of the entropy's sums, would
    # be written out whole (see in_row_blocks): the scratch is then one block's.
    blocked = (mask is not None or ls.spec.logit_softcap is not None
               or (low_precision(logits) and ls.entropy))
    sums = lambda z, m: class_sums(z, m, ls, in_blocks=blocked)
    stats = in_row_blocks(sums, logits, mask, blocked=blocked)
    shift, log_sum, entropy = stats
    return label_log_prob(capped_y, found, shift, log_sum, ls), entropy, stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _rows(logits, labels, mask, ls: LogProbSpec):
    return _forward(logits, labels, mask, ls)[:2]


def _rows_fwd(logits, labels, mask, ls):
    log_prob, entropy, stats = _forward(logits, labels, mask, ls)
    return (log_prob, entropy), (logits, labels, mask, stats)


def _rows_bwd(ls, residuals, cotangents):
    logits, labels, mask, stats = residuals
    g_log_prob, g_entropy = cotangents
    z = upcast_unshared(logits)
    dz = label_cotangents(z, labels, mask, stats, g_log_prob, g_entropy, ls)
    return sum_like(dz.astype(logits.dtype), logits), None, None


_rows.defvjp(_rows_fwd, _rows_bwd)


def label_log_probs(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    return_entropy: bool = False,
    class_axis_name: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-probability of each example's label, and optionally the entropy, of a tempered softmax.

    .. math::
        \log p_y, \quad H = -\sum_k p_k \log p_k, \qquad
        p = \operatorname{softmax}\big(c \tanh(z / c) / \tau\big),

    per example, in nats, without reduction: the terms of policy-gradient objectives such as
    GRPO's :math:`\sum_n a_n \log p_{n y_n} + \beta \sum_n H_n`. Equal to
    ``take_along_axis(log_softmax(softcap(logits) / temperature), labels)`` without
    materialising the log-probabilities, with closed-form gradients
    :math:`(e_y - p) / \tau` and :math:`-p (\log p + H) / \tau` (times the soft-cap's
    derivative :math:`1 - \tanh^2(z / c)`).

    Args:
      logits: floating logits; ``axis`` holds the K classes.
      labels: integer class ids of the batch shape (the logits' shape without ``axis``; with
        several class axes, a flat C-order index into them in the order ``axis`` lists them).
      axis: the class axis or axes.
      temperature: :math:`\tau > 0` (a static, finite number); the softmax of the logits
        divided by it (after the soft-cap).
      logit_softcap: :math:`c \in (0, 2^{100}]`; logits pass through :math:`c \tanh(z / c)`
        first (Gemma 2); a :math:`-\infty` logit stays an impossible class.
      where: boolean mask broadcastable to ``logits`` (a mask of the batch shape masks whole
        examples). Masked classes take no part; a fully masked example gives 0 and gradient 0.
      ignore_index: examples whose label equals it give log-probability 0, entropy 0 and
        gradient 0, whatever their logits hold (even NaN or :math:`\pm\infty`), so
        ``(log_probs * mask).sum()`` never meets a NaN.
      return_entropy: also return the entropy of each example's tempered softmax.
      class_axis_name: inside ``shard_map``, the mesh axis over which the class axis is split
        (each device holds a contiguous slice, in device order; labels are global ids); O(N)
        statistics are combined with ``pmax``/``psum`` and give the single-device numbers.
        ``shard_map`` must keep ``check_vma=True``.

    Returns:
      The log-probabilities, of the batch shape, in float32 (float64 for float64 logits);
      with ``return_entropy`` the pair ``(log_probs, entropy)``.

    Note:
      A :math:`-\infty` logit is an impossible class, like a masked one: it takes no part and
      :math:`0 \log 0 = 0` in the entropy and its gradient (no NaN). A label on an impossible
      class (or in a row whose logits are all :math:`-\infty`) has log-probability
      :math:`-\infty`; its gradient is the closed form :math:`-p / \tau` on the possible
      classes and 0 on the label's (as the integer-label cross-entropy, whose loss is then
      :math:`+\infty` with gradient :math:`p`). A label outside ``[0, K)`` that is not
      ``ignore_index`` gives NaN (never a silent wrap to another class; :func:`jaxce.checked`
      raises instead), and a NaN gradient row where its log-probability is differentiated;
      its entropy is unaffected. bf16/f16 logits are computed in float32; the gradient has
      the logits' dtype. The custom VJP keeps the logits and three numbers per example.
      Forward mode (``jax.jvp``, ``jax.jacfwd``) is not defined for a custom VJP and raises
      JAX's error: use ``jax.grad`` or ``jax.vjp``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxce
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
      >>> labels = jnp.array([0, 1])
      >>> print(jaxce.label_log_probs(logits, labels).round(5))
      [-0.40761 -1.40761]
      >>> log_p, h = jaxce.label_log_probs(logits, labels, temperature=0.5, return_entropy=True)
      >>> print(log_p.round(5), h.round(5))
      [-0.14293 -2.14293] [0.44106 0.44106]
      >>> objective = lambda z: jnp.sum(jaxce.label_log_probs(z, jnp.array(0)))
      >>> print(jax.grad(objective)(jnp.array([2.0, 1.0, 0.0])).tolist())  # e_y - p
      [0.33476, -0.24473, -0.09003]
    """
    opts, ls = make_log_prob_spec(
        temperature, logit_softcap, return_entropy, ignore_index, class_axis_name
    )
    examples, class_where = example_mask(logits, axis, where, opts)
    z, mask, axes, batch_shape = logits_in_rows(logits, axis, class_where, opts)
    what = f"logits shape without axis {axis}"
    ids, ignored = integer_labels(labels, batch_shape, what, opts.ignore_index)
    if examples is not None:  # examples left out as ignored ones, with no [..., K] mask
        ignored = left_out_rows(ignored, examples)
        ids = jnp.where(ignored, 0, ids)
    check_finite("logits", logits, axes, where=where, class_axis_name=class_axis_name)
    taking_part = lambda: counted_rows(mask, left_out_rows(None, examples), batch_shape, opts.spec)
    check_labels(
        labels, z.shape[-1], ignore_index=opts.ignore_index, class_axis_name=class_axis_name,
        taking_part=taking_part,
    )
    check_varying(opts, ("logits", z), ("logits", z))
    log_probs, entropy = _rows(z, ids, mask, ls)
    # Uncounted rows (ignored, fully masked) give 0, and their cotangent is 0 (the double
    # where: a NaN or -inf there reaches neither the output nor the gradient).
    counted = counted_rows(mask, ignored, batch_shape, opts.spec)
    log_probs = jnp.where(counted, log_probs, 0.0)
    if not return_entropy:
        return log_probs
    return log_probs, jnp.where(counted, entropy, 0.0)
