"""A float64 NumPy reference for jaxce's softmax cross-entropies, written from the documented
semantics (README's Options table and the docstrings), not from jaxce's code.

For one example with logits z (softcapped to c tanh(z / c) when ``cap`` is set; a -inf logit
stays -inf), class mask m and labels y (a distribution, or the one-hot of an integer label):

- possible classes: m_k and z_k > -inf; K_m their count; lse = log sum_possible e^{z_k}
  (-inf when nothing is possible);
- targets t_k = w_k ((1 - eps) y_k + eps / K_m [k possible]); T = sum_k t_k;
- loss = sum_k t_k (lse - z_k) + z_loss lse^2, with 0 (lse - z_k) = 0, and a positive target on
  an impossible class (or a row with nothing possible) giving +inf; an integer label outside
  [0, K) that is not ``ignore_index`` gives NaN;
- examples with ``ignore_index`` or with every class masked give 0 and do not count;
- sample weights multiply; "mean" divides by the counted examples' sum of w_{y_n} s_n (integer
  labels with class weights, PyTorch) or of s_n; 0 when nothing counts; ``base`` divides by ln b;
- d loss / d z_k = g (p_k (T + 2 z_loss lse) - t_k) times the softcap's derivative, 0 on
  impossible classes (and on rows with nothing possible), NaN on the possible classes of an
  out-of-range label's row;
- aux: per-example logsumexp in nats (ignored rows included; -inf without a possible class),
  z-loss term z_loss lse^2 / ln b (0 on rows without a possible class), correct: a counted
  example whose label's (softcapped) logit is the largest possible one;
- nll_loss: loss = -w_y lp_y on the given log-probabilities (masked entries are -inf),
  d loss / d lp_y = -g w_y at an unmasked label (even where lp_y = -inf), 0 elsewhere, NaN on
  the unmasked classes of an out-of-range label's row.

Every function also returns absolute tolerances from a first-order error model of a float32
(or float64) computation: ``eps`` is the unit roundoff of the computing dtype and the errors
are those of the exponent z_k - lse, of the logsumexp (which cannot be off by more than its
distance to the row maximum when that maximum is an input value) and of the final sums.
"""

import numpy as np

C = 8.0  # safety factor of the error model


def _softcap(z, cap):
    if cap is None:
        return z.copy()
    out = cap * np.tanh(z / cap)
    return np.where(np.isneginf(z), -np.inf, out)


def _softcap_slope(z, cap):
    if cap is None:
        return np.ones_like(z)
    with np.errstate(all="ignore"):
        slope = 1.0 - np.tanh(z / cap) ** 2
    return np.where(np.isfinite(z), slope, 0.0)


def reference(
    z,
    labels,
    *,
    integer,
    nll=False,
    mask=None,
    class_weights=None,
    sample_weights=None,
    label_smoothing=0.0,
    z_loss=0.0,
    cap=None,
    base=None,
    reduction="none",
    ignore_index=None,
    cotangent=None,
    eps=2.0**-24,
    logit_error=None,
):
    """Everything the matrix compares, as float64 NumPy arrays (dict).

    z: [N, K] float64 logits (log-probabilities for ``nll``), already rounded to the input dtype.
    labels: [N] Python-int-valued integer labels, or [N, K] float64 distributions.
    mask: [N, K] bool or None. Weights: float64 or None (sample weights may hold NaN on
    uncounted rows). cotangent: [N] for reduction "none". logit_error: [N, K] bound on the error
    of the logits themselves (the fused path's matmul), or None.
    """
    with np.errstate(all="ignore"):
        return _reference(
            np.asarray(z, np.float64),
            labels,
            integer=integer,
            nll=nll,
            mask=mask,
            class_weights=class_weights,
            sample_weights=sample_weights,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            cap=cap,
            base=base,
            reduction=reduction,
            ignore_index=ignore_index,
            cotangent=cotangent,
            eps=eps,
            logit_error=logit_error,
        )


def _reference(
    z,
    labels,
    *,
    integer,
    nll,
    mask,
    class_weights,
    sample_weights,
    label_smoothing,
    z_loss,
    cap,
    base,
    reduction,
    ignore_index,
    cotangent,
    eps,
    logit_error,
):
    n, k = z.shape
    lnb = 1.0 if base is None else np.log(base)
    m = np.ones((n, k), bool) if mask is None else np.asarray(mask, bool)
    w = np.ones(k) if class_weights is None else np.asarray(class_weights, np.float64)
    s = np.ones(n) if sample_weights is None else np.asarray(sample_weights, np.float64)
    v = np.ones(n) if cotangent is None else np.asarray(cotangent, np.float64)
    dlogit = np.zeros((n, k)) if logit_error is None else np.asarray(logit_error, np.float64)
    ls, lam = float(label_smoothing), float(z_loss)
    classes = np.arange(k)

    held = m.any(axis=1)  # not fully masked by `where`
    if integer:
        y = np.array([int(a) for a in labels], dtype=object)
        in_range = np.array([0 <= a < k for a in y])
        ignored = np.array([ignore_index is not None and a == ignore_index for a in y])
        counted = held & ~ignored
        yi = np.array([a if 0 <= a < k else 0 for a in y], dtype=np.int64)
        onehot = (classes[None, :] == yi[:, None]) & in_range[:, None]
    else:
        in_range = np.ones(n, bool)
        counted = held
        ysoft = np.asarray(labels, np.float64)
    bad = counted & ~in_range  # out-of-range labels: NaN

    out = {"counted": counted, "bad": bad}

    # --- nll_loss: linear in the log-probabilities -------------------------------------------
    if nll:
        lp = np.where(m, z, -np.inf)
        wy = np.where(in_range, w[yi], 0.0)
        lpy = np.where(in_range, lp[np.arange(n), yi], np.nan)
        loss = np.where(wy == 0, 0.0, -wy * lpy)
        loss = np.where(in_range, loss, np.nan)
        loss = np.where(counted, loss, 0.0)
        tl = C * eps * np.where(np.isfinite(loss), np.abs(loss), 0.0)
        norm = wy if class_weights is not None else np.ones(n)
        red = _reduce(loss, tl, counted, norm, s, v, reduction, lnb, eps)
        out.update(red)
        g = red["g"]
        dz = np.where(onehot & m, -(g * wy)[:, None], 0.0)
        # masked classes and log-probabilities of -inf keep gradient 0
        dz = np.where(bad[:, None] & m & np.isfinite(z), np.nan, dz)
        out["dz"] = dz
        out["dz_atol"] = C * eps * np.abs(np.where(np.isfinite(dz), dz, 0.0))
        # d/dw_k of -w_y lp_y: -lp_y at k = y
        dlw = np.where(onehot, -lp[np.arange(n), yi][:, None], 0.0)
        out.update(
            _weight_grads(
                loss,
                tl,
                dlw,
                np.zeros_like(dlw),
                counted,
                red,
                s,
                v,
                norm,
                onehot if class_weights is not None else None,
                reduction,
                lnb,
                eps,
            )
        )
        return out

    # --- softmax cross-entropy -----------------------------------------------------------------
    zc = _softcap(z, cap)
    slope = _softcap_slope(z, cap)
    possible = m & ~np.isneginf(zc)
    km = possible.sum(axis=1)
    any_possible = km > 0
    mx = np.where(any_possible, np.max(np.where(possible, zc, -np.inf), axis=1), 0.0)
    mx_safe = np.where(any_possible, mx, 0.0)
    e = np.where(possible, np.exp(np.where(possible, zc, 0.0) - mx_safe[:, None]), 0.0)
    ssum = e.sum(axis=1)
    lse = np.where(any_possible, mx_safe + np.log(np.where(any_possible, ssum, 1.0)), -np.inf)
    p = np.where(possible, e / np.where(any_possible, ssum, 1.0)[:, None], 0.0)

    y = onehot.astype(np.float64) if integer else ysoft
    smooth = np.where(possible, ls / np.maximum(km, 1)[:, None], 0.0)
    u = (1.0 - ls) * y + smooth  # unweighted targets
    t = w[None, :] * u
    T = t.sum(axis=1)
    gap = np.where(possible, lse[:, None] - np.where(possible, zc, 0.0), np.inf)  # lse - z_k
    terms = np.where(t == 0, 0.0, t * gap)
    zterm = np.where(lam == 0, 0.0, lam * lse**2)
    loss = terms.sum(axis=1) + zterm
    loss = np.where(bad, np.nan, loss)
    loss = np.where(counted, loss, 0.0)

    # error model (nats, per example). delta[n, k] bounds the error of z_k - max (subtraction,
    # softcap's tanh of both, the fused matmul of both); the logsumexp's error relative to the
    # max is the p-weighted mean of those, plus the rounding of log s, plus the rounding of the
    # stored lse (never further than its distance to the max, a representable value), plus the
    # label-logit shift of integer labels (used only within ~88 of the max, README).
    lse_f = np.where(np.isfinite(lse), lse, 0.0)
    zc_f = np.where(possible, zc, mx_safe[:, None])
    dist = np.abs(zc_f - mx_safe[:, None])  # |z_k - max|
    top = possible & (dist == 0)
    # (the max itself is one rounded number: z_max - max is exact, whatever z_max's error)
    other = dlogit + np.max(np.where(top, dlogit, 0.0), axis=1)[:, None]
    if cap is not None:
        other = other + C * eps * (np.abs(zc_f) + np.abs(mx_safe)[:, None])
    delta = C * eps * (dist + 1.0) + np.where(top, 0.0, other)
    delta = np.where(possible, delta, 0.0)
    if integer:
        dy = np.where(in_range & possible[np.arange(n), yi], dist[np.arange(n), yi], 0.0)
    else:
        dy = np.zeros(n)
    gap_to_max = np.abs(lse_f - mx_safe)
    dlse = (
        (p * delta).sum(axis=1)
        + C * eps * (1.0 + gap_to_max + np.minimum(dy, 128.0))
        + np.minimum(C * eps * np.abs(lse_f), gap_to_max + C * eps)
    )
    dexp = dlse[:, None] + delta  # error of z_k - lse
    tabs = np.abs(np.where(possible, t, 0.0))
    loss_f = np.where(np.isfinite(loss), np.abs(loss), 0.0)
    tl = (
        T * dlse
        + (tabs * delta).sum(axis=1)
        + C * eps * loss_f
        + lam * (2 * np.abs(lse_f) * dlse + C * eps * lse_f**2)
    )
    tl = np.where(counted, tl, 0.0)

    if integer and class_weights is not None:
        norm = np.where(in_range, w[yi], 0.0)
    else:
        norm = np.ones(n)
    red = _reduce(loss, tl, counted, norm, s, v, reduction, lnb, eps)
    out.update(red)
    g = red["g"]

    # gradient with respect to the (raw) logits
    coef = T + 2 * lam * lse_f
    core = np.where(possible, p * coef[:, None] - t, 0.0)
    dz = g[:, None] * core * slope
    dz = np.where(any_possible[:, None], dz, 0.0)
    dz = np.where(bad[:, None] & possible, np.nan, dz)  # impossible classes keep gradient 0
    dp = np.where(p > 0, p * np.expm1(np.minimum(dexp, 30.0)), 0.0)
    dcore = (
        np.abs(coef)[:, None] * dp
        + p * (C * eps * np.abs(coef)[:, None] + 2 * lam * dlse[:, None])
        + C * eps * np.abs(t)
    )
    dz_atol = np.abs(g)[:, None] * (dcore * slope + np.abs(core) * C * eps)
    out["dz"] = dz
    out["dz_atol"] = np.where(possible & counted[:, None], dz_atol, 0.0)
    out["p"] = p

    # gradient with respect to soft labels: g w_k (1 - eps) (lse - z_k) on possible classes
    if not integer:
        dyl = g[:, None] * w[None, :] * (1.0 - ls) * np.where(possible, gap, 0.0)
        dyl_atol = (
            np.abs(g)[:, None]
            * w[None, :]
            * (1.0 - ls)
            * (dlse[:, None] + delta + C * eps * np.abs(np.where(possible, gap, 0)))
        )
        out["dlabels"] = np.where(counted[:, None], dyl, 0.0)
        out["dlabels_atol"] = dyl_atol
        # checked where the class is possible in a counted row, and everywhere on uncounted rows
        out["dlabels_checked"] = (possible & counted[:, None]) | ~counted[:, None]

    # gradient with respect to the class weights: d loss_n / d w_k = u_k (lse - z_k)
    dlw = np.where(u == 0, 0.0, u * gap)
    dlw_err = np.where(u == 0, 0.0, np.abs(u) * (dlse[:, None] + delta))
    out.update(
        _weight_grads(
            loss,
            tl,
            dlw,
            dlw_err,
            counted,
            red,
            s,
            v,
            norm,
            onehot if (integer and class_weights is not None) else None,
            reduction,
            lnb,
            eps,
        )
    )

    # aux: per-example logsumexp (nats), z-loss term (units of the loss), correct
    # (the absolute lse also carries the error of the max itself: softcap's tanh, the matmul)
    out["aux_lse"] = lse
    mx_err = np.max(np.where(top, dlogit, 0.0), axis=1)
    if cap is not None:
        mx_err = mx_err + C * eps * np.abs(mx_safe)
    out["aux_lse_atol"] = dlse + mx_err
    # z-loss term per example, like the logsumexp beside it: lam lse^2 / ln b on every row with a
    # possible class (ignored rows included), 0 on rows without one (fully masked, all -inf)
    out["aux_z"] = np.where(any_possible & (lam != 0), lam * lse_f**2, 0.0) / lnb
    out["aux_z_atol"] = lam * (2 * np.abs(lse_f) * (dlse + mx_err) + C * eps * lse_f**2) / lnb
    if integer:
        zy = np.where(in_range, zc[np.arange(n), yi], -np.inf)
        ok = in_range & possible[np.arange(n), yi] & counted
        others = np.where(possible & ~onehot, zc, -np.inf).max(axis=1)
        margin = zy - others
        out["correct"] = ok & (margin > 0)
        tie_tol = 4 * (C * eps * (np.abs(mx_safe) + 1.0) + np.max(delta, axis=1))
        out["correct_checked"] = ~ok | ~(
            np.abs(np.where(np.isfinite(margin), margin, np.inf)) <= tie_tol
        )
    return out


def _reduce(loss, tl, counted, norm, s, v, reduction, lnb, eps):
    """Reduced value, its tolerance, and the per-example cotangent g (including 1 / ln b)."""
    n = loss.shape[0]
    s_eff = np.where(counted, s, 0.0)  # a NaN sample weight on an uncounted row takes no part
    weighted = np.where(counted, loss * s_eff, 0.0)
    wtl = np.abs(s_eff) * tl
    out = {"loss_none": weighted / lnb}
    out["loss_none_atol"] = wtl + C * eps * np.abs(np.where(np.isfinite(weighted), weighted, 0))
    out["loss_none_atol"] /= lnb
    finite_w = np.where(np.isfinite(weighted), np.abs(weighted), 0.0)
    total = weighted.sum()
    den = np.where(counted, norm * s_eff, 0.0).sum()
    out["den"] = den
    if reduction == "none":
        out["value"] = out["loss_none"]
        out["value_atol"] = out["loss_none_atol"]
        g = v * s_eff / lnb
    elif reduction == "sum":
        out["value"] = np.float64(total / lnb)
        out["value_atol"] = np.float64((wtl.sum() + C * eps * finite_w.sum()) / lnb)
        g = s_eff / lnb
    else:
        if den > 0:
            value = total / den
            atol = (wtl.sum() + C * eps * finite_w.sum()) / den
            atol += C * eps * np.abs(value if np.isfinite(value) else 0.0)
            g = s_eff / den / lnb
        else:
            value, atol, g = 0.0, 0.0, np.zeros(n)
        out["value"] = np.float64(value / lnb)
        out["value_atol"] = np.float64(atol / lnb)
    out["g"] = np.where(counted, g, 0.0)
    out["total"] = total
    return out


def _weight_grads(
    loss, tl, dlw, dlw_err, counted, red, s, v, norm, label_onehot, reduction, lnb, eps
):
    """Gradients with respect to sample weights and class weights, and their tolerances.

    dlw[n, k] = d loss_n / d w_k (not weighted by s_n); norm[n]: each example's share of the
    mean's denominator per unit of sample weight (w_{y_n} or 1); label_onehot: [n, k] the labels
    when that share is w_{y_n} (integer labels with class weights), else None. Meaningful only
    when every counted loss is finite (the caller checks).
    """
    n, k = dlw.shape
    s_eff = np.where(counted, s, 0.0)
    dlw = np.where(counted[:, None], dlw, 0.0)
    dlw_err = np.where(counted[:, None], dlw_err + C * eps * np.abs(dlw), 0.0)
    if reduction == "none":
        dsw = v * loss / lnb
        dsw_atol = np.abs(v) * (tl + C * eps * np.abs(loss)) / lnb
        dcw = (v * s_eff) @ dlw / lnb
        dcw_atol = np.abs(v * s_eff) @ dlw_err / lnb
    elif reduction == "sum":
        dsw = loss / lnb
        dsw_atol = (tl + C * eps * np.abs(loss)) / lnb
        dcw = s_eff @ dlw / lnb
        dcw_atol = np.abs(s_eff) @ dlw_err / lnb
    elif red["den"] > 0:
        den = red["den"]
        mean = red["total"] / den  # nats
        mean_err = (np.abs(s_eff) @ tl + C * eps * np.abs(s_eff * loss).sum()) / den
        dsw = (loss - mean * norm) / den / lnb
        dsw_atol = (
            (tl + np.abs(norm) * mean_err + C * eps * (np.abs(loss) + np.abs(mean * norm)))
            / den
            / lnb
        )
        dden = np.zeros(k) if label_onehot is None else s_eff @ label_onehot.astype(np.float64)
        dcw = (s_eff @ dlw - mean * dden) / den / lnb
        dcw_atol = (
            (np.abs(s_eff) @ dlw_err + dden * mean_err + C * eps * np.abs(mean * dden)) / den / lnb
        )
    else:
        dsw, dsw_atol = np.zeros(n), np.zeros(n)
        dcw, dcw_atol = np.zeros(k), np.zeros(k)
    return {
        "dsw": np.where(counted, dsw, 0.0),
        "dsw_atol": np.where(counted, dsw_atol, 0.0),
        "dcw": dcw,
        "dcw_atol": dcw_atol,
    }
