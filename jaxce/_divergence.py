r"""Divergences between two softmaxes, for distilling a teacher's softmax into a student's.

With temperature :math:`\tau`, :math:`p_s = \operatorname{softmax}(z_s / \tau)` (the student)
and :math:`p_t = \operatorname{softmax}(z_t / \tau)` (the teacher), per example:

.. math::
    \text{forward KL: } D(p_t \| p_s), \qquad \text{reverse KL: } D(p_s \| p_t), \qquad
    \text{JSD}_\beta = \beta D(p_t \| m) + (1 - \beta) D(p_s \| m),
    \quad m = \beta p_t + (1 - \beta) p_s.

Each is a function :math:`F(p_s, p_t)`, and the gradient in the logits of one side is the
softmax's Jacobian applied to :math:`a = \partial F / \partial p`:
:math:`\partial F / \partial z = p \odot (a - \langle p, a \rangle) / \tau`. In closed form,
times :math:`1 / \tau`:

- forward KL: student :math:`p_s T_t - p_t`, teacher
  :math:`p_t \odot (\log p_t - \log p_s - F)`;
- reverse KL: student :math:`p_s \odot (\log p_s - \log p_t - F)`, teacher
  :math:`p_t T_s - p_s`;
- JSD: student :math:`(1 - \beta)\, p_s \odot (b_s - \langle p_s, b_s \rangle)`, teacher
  :math:`\beta\, p_t \odot (b_t - \langle p_t, b_t \rangle)`,

with :math:`T = \sum_k p_k` (1, or 0 for a row without a possible class) and
:math:`b = \log p - \log m`. The forward KL's student gradient is the seed notes'
:math:`p - y` with the teacher's softmax as the target.
"""

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._information import xdiff
from ._options import (
    check_segments,
    check_varying,
    check_weights,
    counted_rows,
    example_mask,
    finish,
    left_out_rows,
    logits_in_rows,
    make_options,
)
from ._row_sums import reduce_rows
from ._softmax import move_axes_last
from ._spec import class_max, class_sum
from ._validation import check_floating, check_shape, compute_dtype, static_number
from ._value_checks import check_finite

KINDS = ("forward_kl", "reverse_kl", "jsd")


class DivergenceSpec(NamedTuple):
    """The static options of a divergence (hashable: a ``nondiff_argnum``)."""

    kind: str
    beta: float
    temperature: float
    class_axis_name: Any = None


def divergence_spec(kind, beta, temperature, class_axis_name) -> DivergenceSpec:
    """Validate the options; raise at trace time naming the offending value."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    beta = static_number("beta", beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    temperature = static_number("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return DivergenceSpec(kind, beta, temperature, class_axis_name)


def divergence_options(
    kind, beta, temperature, base, reduction, class_axis_name, batch_axis_name, num_segments
):
    """``(spec, opts)``: the divergence's own options, and the shared ones (base, reduction,
    mesh axes) as the cross-entropies validate them."""
    spec = divergence_spec(kind, beta, temperature, class_axis_name)
    opts = make_options(
        integer_labels=False, label_smoothing=0.0, z_loss=0.0, logit_softcap=None, base=base,
        reduction=reduction, return_aux=False, class_axis_name=class_axis_name,
        batch_axis_name=batch_axis_name, segmented=True, num_segments=num_segments,
    )
    return spec, opts


def normalizer(z, mask, spec: DivergenceSpec):
    """``(c, log s)`` of a row over the classes of all shards: the maximum c of the logits,
    *before* the temperature (0 for a row without a possible class), and
    :math:`\\log s = \\log \\sum_k e^{(z_k - c) / \\tau}`.

    Shifting before dividing keeps :math:`z / \\tau` from overflowing (logits near the largest
    float with :math:`\\tau < 1`), and the difference of nearby logits is exact. The shift
    cancels from the log-softmax: it gets no derivative (``jax.hessian`` differentiates the
    backward pass, which calls this)."""
    z = possible_logits(z, mask)
    top = class_max(jax.lax.stop_gradient(reduce_rows(lambda z: z, (z,), op=jnp.max)), spec)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    terms = lambda z, c: jnp.exp(_tempered_gap(z, c, spec))
    log_sum = jnp.log(class_sum(reduce_rows(terms, (z,), (shift,)), spec))
    return shift, log_sum


def possible_logits(z, mask):
    """``z`` in the compute dtype, -inf where masked."""
    z = z.astype(compute_dtype(z.dtype))
    return z if mask is None else jnp.where(mask, z, -jnp.inf)


def _tempered_gap(z, shift, spec: DivergenceSpec):
    """:math:`(z - c) / \\tau`. Where z - c overflows to -inf (finite logits of both signs near
    the largest float) the quotient is -inf too for :math:`\\tau \\le 1`; above 1 it may be
    finite, and comes from the halves :math:`(z/2 - c/2) / (\\tau/2)`, exact in binary floating
    point (a select per logit that the common :math:`\\tau \\le 1` does without)."""
    gap = z - shift
    if spec.temperature <= 1.0:
        return gap / spec.temperature
    halves = (0.5 * z - 0.5 * shift) / (0.5 * spec.temperature)
    return jnp.where(jnp.isfinite(gap), gap / spec.temperature, halves)


def log_softmax(z, mask, shift, log_sum, spec: DivergenceSpec):
    """``log softmax(z / tau)`` given the row's normaliser (of all its classes, so ``z`` may be
    a slice of them); -inf for impossible classes and for every class of an empty row."""
    z = possible_logits(z, mask)
    # (z - c) / tau - log s, not z / tau - (c / tau + log s): for logits near 1e4 the sum
    # would round away most of log s, and with it the probabilities' precision.
    gap = _tempered_gap(z, shift[..., None], spec)
    return jnp.where(z > -jnp.inf, gap - log_sum[..., None], -jnp.inf)


def _log_mixture(log_ps, log_pt, beta):
    """:math:`\\log m = \\log(\\beta p_t + (1 - \\beta) p_s)`: finite wherever either is > 0."""
    return jnp.logaddexp(math.log(beta) + log_pt, math.log1p(-beta) + log_ps)


def _row_sum(x, spec: DivergenceSpec):
    return class_sum(jnp.sum(x, axis=-1), spec)


def terms(log_ps, log_pt, spec: DivergenceSpec):
    """``(student terms, teacher terms)`` [..., K] whose sum over the classes is the divergence
    (None for a side without any): :math:`p_t (\\log p_t - \\log p_s)` (forward KL),
    :math:`p_s (\\log p_s - \\log p_t)` (reverse KL), :math:`(1 - \\beta) p_s (\\log p_s -
    \\log m)` and :math:`\\beta p_t (\\log p_t - \\log m)` (JSD). A term whose weight p is 0 is
    0 (``xdiff``); a weight p > 0 against log-probability -inf is +inf."""
    ps, pt = jnp.exp(log_ps), jnp.exp(log_pt)
    if spec.kind == "forward_kl":
        return None, xdiff(pt, log_pt, log_ps)
    if spec.kind == "reverse_kl":
        return xdiff(ps, log_ps, log_pt), None
    log_m = _log_mixture(log_ps, log_pt, spec.beta)
    return (1.0 - spec.beta) * xdiff(ps, log_ps, log_m), spec.beta * xdiff(pt, log_pt, log_m)


class RowSums(NamedTuple):
    """Per-example sums over all classes that the closed-form gradients need."""

    value: jax.Array  # the divergence F
    student_terms: jax.Array  # the sum of the student's terms (0 without)
    teacher_terms: jax.Array
    student_mass: jax.Array  # sum_k p_s: 1, or 0 for a row without a possible class
    teacher_mass: jax.Array


def row_sums(log_ps, log_pt, spec: DivergenceSpec) -> RowSums:
    student, teacher = terms(log_ps, log_pt, spec)
    student_sum, teacher_sum = (
        jnp.zeros(log_ps.shape[:-1], log_ps.dtype) if x is None else _row_sum(x, spec)
        for x in (student, teacher)
    )
    return RowSums(
        student_sum + teacher_sum, student_sum, teacher_sum,
        _row_sum(jnp.exp(log_ps), spec), _row_sum(jnp.exp(log_pt), spec),
    )


def _pullback(p, p_times_a, p_dot_a):
    """:math:`p \\odot (a - \\langle p, a \\rangle)` given :math:`p \\odot a` (0 where p = 0)
    and the row sum :math:`\\langle p, a \\rangle`: the softmax's Jacobian applied to a."""
    return p_times_a - p * p_dot_a[..., None]


def student_cotangent(log_ps, log_pt, sums: RowSums, spec: DivergenceSpec):
    """:math:`\\tau\\, \\partial F / \\partial z_s` (see the module's list); ``log_ps`` and
    ``log_pt`` may be a slice of the classes, ``sums`` are over all of them. NaN on a row
    whose reverse KL is +inf (its value's derivative is not defined there)."""
    ps = jnp.exp(log_ps)
    if spec.kind == "forward_kl":
        return ps * sums.teacher_mass[..., None] - jnp.exp(log_pt)
    student, _ = terms(log_ps, log_pt, spec)
    undefined = jnp.where(jnp.isfinite(sums.value), 0.0, jnp.nan)[..., None]
    return _pullback(ps, student, sums.student_terms) + undefined


def teacher_cotangent(log_ps, log_pt, sums: RowSums, spec: DivergenceSpec):
    """:math:`\\tau\\, \\partial F / \\partial z_t`, as :func:`student_cotangent` with the roles
    exchanged (NaN on a row whose forward KL is +inf)."""
    pt = jnp.exp(log_pt)
    if spec.kind == "reverse_kl":
        return pt * sums.student_mass[..., None] - jnp.exp(log_ps)
    _, teacher = terms(log_ps, log_pt, spec)
    undefined = jnp.where(jnp.isfinite(sums.value), 0.0, jnp.nan)[..., None]
    return _pullback(pt, teacher, sums.teacher_terms) + undefined


def pulled(cotangent, g, dtype, spec: DivergenceSpec):
    """``g / tau`` times a row's cotangent, in ``dtype``; a row whose ``g`` is 0 (uncounted,
    or not used) contributes 0, even where its gradient is undefined (NaN)."""
    scale = (g / spec.temperature)[..., None]
    return jnp.where(scale != 0, scale * cotangent, 0.0).astype(dtype)


def _both_log_softmaxes(student, teacher, mask, spec):
    return tuple(log_softmax(z, mask, *normalizer(z, mask, spec), spec) for z in (student, teacher))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def divergence_rows(student, teacher, mask, spec: DivergenceSpec):
    """Each row's divergence of softmaxes of the logits ``student`` and ``teacher`` [..., K]."""
    return _divergence_rows_fwd(student, teacher, mask, spec)[0]


def _divergence_rows_fwd(student, teacher, mask, spec):
    # The primal is computed here rather than by calling divergence_rows, so that jax.hessian
    # (forward over reverse) can differentiate this function (and the backward pass).
    value = row_sums(*_both_log_softmaxes(student, teacher, mask, spec), spec).value
    return value, (student, teacher, mask)  # the inputs only: no [N, K] residual


def _divergence_rows_bwd(spec, residuals, g):
    student, teacher, mask = residuals
    log_ps, log_pt = _both_log_softmaxes(student, teacher, mask, spec)
    sums = row_sums(log_ps, log_pt, spec)
    d_student = pulled(student_cotangent(log_ps, log_pt, sums, spec), g, student.dtype, spec)
    d_teacher = pulled(teacher_cotangent(log_ps, log_pt, sums, spec), g, teacher.dtype, spec)
    return d_student, d_teacher, None


divergence_rows.defvjp(_divergence_rows_fwd, _divergence_rows_bwd)


def softmax_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    axis: int | Sequence[int] = -1,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    base: float | None = None,
    reduction: str = "none",
    class_axis_name: Any = None,
    batch_axis_name: Any = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> jax.Array:
    r"""A divergence between the student's and the teacher's softmax: knowledge distillation.

    With :math:`p_s = \operatorname{softmax}(z_s / \tau)` and
    :math:`p_t = \operatorname{softmax}(z_t / \tau)`:

    - ``"forward_kl"``: :math:`D_{KL}(p_t \| p_s)` (mean-seeking: classic distillation);
    - ``"reverse_kl"``: :math:`D_{KL}(p_s \| p_t)` (mode-seeking);
    - ``"jsd"``: :math:`\beta D_{KL}(p_t \| m) + (1 - \beta) D_{KL}(p_s \| m)`,
      :math:`m = \beta p_t + (1 - \beta) p_s`: finite always, at most
      :math:`-\beta \log \beta - (1 - \beta) \log(1 - \beta)` (:math:`\log 2` at
      :math:`\beta = 1/2`).

    The result is not multiplied by :math:`\tau^2` (Hinton et al. scale the soft loss so; do
    it yourself if you want it).

    Args:
      student_logits: floating logits of the student; ``axis`` holds the K classes.
      teacher_logits: floating logits of the teacher, the same shape (any floating dtype).
      axis: the class axis or axes.
      kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
      beta: the JSD's weight :math:`\beta \in (0, 1)` of the teacher (unused by the KLs).
      temperature: :math:`\tau > 0`; both logits are divided by it.
      where: boolean mask broadcastable to the logits (a mask of the batch shape masks whole
        examples). Masked classes take no part in either softmax; a fully masked example has
        divergence 0, gradient 0, and does not count in ``"mean"``.
      sample_weights: the batch shape; multiplies each example's divergence.
      base: logarithm base (``None`` nats, ``2`` bits, ``10`` hartleys).
      reduction: ``"none"`` (per example), ``"sum"``, ``"mean"`` (over the counted
        examples, weighted by their sample weights; 0 when nothing counts) or
        ``"segment_mean"`` (that mean within each segment, then over the segments: as in
        :func:`~jaxce.softmax_cross_entropy_with_integer_labels`).
      class_axis_name: inside ``shard_map``, the mesh axis over which the class axis of both
        logits is split (contiguous slices, in device order); O(N) statistics are combined
        with ``pmax`` / ``psum``, and the result is the single-device number.
      batch_axis_name: the mesh axis over which the batch is split; ``"sum"`` and ``"mean"``
        become global.
      segment_ids: with ``"segment_mean"``, each example's segment id (the batch shape).
      num_segments: with ``"segment_mean"``, the number of segment ids (a static int).

    Returns:
      The divergence in float32 (or wider): per example (the batch shape) or a scalar.

    Note:
      Both arguments get closed-form gradients from a custom VJP that keeps only the two
      logits and the per-example values (listed on the module :mod:`jaxce._divergence`);
      for the forward KL the student's is :math:`(p_s - p_t) / \tau`. A class that is
      impossible (a :math:`-\infty` logit, or masked) for both takes no part. Teacher mass
      on a class the student cannot reach makes the forward KL :math:`+\infty` (student
      mass on a class the teacher cannot reach, the reverse KL): the student's gradient
      stays the closed form above, the teacher's is NaN on that example (forward KL; the
      other way round for the reverse KL). A :math:`+\infty` or NaN logit gives NaN.
      bf16/f16 logits are computed in float32; gradients have the logits' dtypes. Forward
      mode (``jax.jvp``, ``jax.jacfwd``) is not defined for a custom VJP and raises JAX's
      error; use reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``); ``jax.hessian``
      (forward over reverse) works.

    Examples:
      >>> import jax.numpy as jnp, jaxce
      >>> student, teacher = jnp.array([1.0, 0.0, -1.0]), jnp.array([2.0, 0.0, -2.0])
      >>> print(jaxce.softmax_divergence(student, teacher).round(5))
      0.11561
      >>> print(jaxce.softmax_divergence(student, teacher, kind="jsd", temperature=2.0).round(5))
      0.01573
    """
    spec, opts = divergence_options(
        kind, beta, temperature, base, reduction, class_axis_name, batch_axis_name, num_segments
    )
    teacher = jnp.asarray(teacher_logits)
    check_floating("teacher_logits", teacher)
    examples, class_where = example_mask(student_logits, axis, where, opts)
    student, mask, axes, batch_shape = logits_in_rows(
        student_logits, axis, class_where, opts, name="student_logits"
    )
    check_shape("teacher_logits", teacher, jnp.shape(student_logits), "student_logits shape")
    teacher = move_axes_last(teacher, axes)
    check_varying(opts, ("student_logits", student), ("student_logits", student))
    check_varying(opts, ("teacher_logits", teacher), ("teacher_logits", teacher))
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        check_finite(
            name, logits, axes, where=where, class_axis_name=class_axis_name,
            batch_axis_name=batch_axis_name,
        )
    _, sample_weights = check_weights(None, sample_weights, student.shape[-1], batch_shape)
    loss = divergence_rows(student, teacher, mask, spec)
    # (examples left out get g = 0, and so exact zeros from ``pulled``: no [N, K] mask)
    counted = counted_rows(mask, left_out_rows(None, examples), batch_shape, opts.spec)
    segments = check_segments(segment_ids, batch_shape, opts)
    return finish(loss, None, None, None, counted, None, sample_weights, opts, segments)
