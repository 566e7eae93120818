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

The forward statistics are in :mod:`jaxce._row_stats`, the closed-form backward pass in
:mod:`jaxce._row_cotangents`; this module pairs them in the in-place path's custom VJP, over
logits that hold every (local) class.
"""

import functools

import jax

from ._row_cotangents import row_cotangents
from ._row_stats import row_stats
from ._row_sums import upcast_unshared
from ._spec import SparseLabels, Spec, sum_like


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def row_losses(logits, labels, mask, counted, class_weights, spec: Spec):
    """Each row's loss, logsumexp and whether its label is the top class (integer labels).

    ``counted`` (None: every row) marks the rows whose loss the caller keeps; elsewhere the
    loss's cotangent is 0, and a row whose logsumexp gets none either has a gradient of
    exactly 0, whatever its logits and labels hold (see ``idle`` in :func:`row_cotangents`)."""
    stats = row_stats(logits, labels, mask, class_weights, spec)
    return stats.loss, stats.logsumexp, stats.correct


def _row_losses_fwd(logits, labels, mask, counted, class_weights, spec):
    # The primal is recomputed here rather than by calling row_losses, so that jax.hessian
    # (forward-over-reverse) can differentiate this function.
    stats = row_stats(logits, labels, mask, class_weights, spec)
    residuals = (logits, labels, mask, counted, class_weights, *stats[1:4])
    return (stats.loss, stats.logsumexp, stats.correct), residuals


def _row_losses_bwd(spec, residuals, cotangents):
    logits, labels, mask, counted, class_weights, normalizer, target_mass, num_possible = residuals
    g_loss, g_lse, _ = cotangents  # `correct` is piecewise constant: no gradient
    z = upcast_unshared(logits)
    # (sparse labels' weights come in the compute dtype)
    targets = labels if spec.integer_labels or spec.sparse_labels else upcast_unshared(labels)
    # Rows left out (ignored or masked examples) get no cotangent: their gradient is 0.
    idle = None if counted is None else ~counted & (g_lse == 0)
    dz, dlabels, dweights = row_cotangents(
        z, targets, mask, class_weights, normalizer, target_mass, num_possible, g_loss, g_lse, spec,
        dtype=logits.dtype, scatter=True, idle=idle,
    )
    if spec.sparse_labels:  # no gradient for the indices
        weights = labels.weights
        dlabels = SparseLabels(None, sum_like(dlabels.astype(weights.dtype), weights))
    elif dlabels is not None:
        dlabels = sum_like(dlabels.astype(labels.dtype), labels)
    if dweights is not None:
        dweights = sum_like(dweights.astype(class_weights.dtype), class_weights)
    return sum_like(dz.astype(logits.dtype), logits), dlabels, None, None, dweights


row_losses.defvjp(_row_losses_fwd, _row_losses_bwd)
