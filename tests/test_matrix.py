"""The option matrix: every documented option of the softmax cross-entropies against a float64
NumPy reference (tests/_reference.py), value and gradients.

The cross product of label kind (integer labels of six dtypes, soft labels, ``nll_loss``), path
(in place, fused ``linear_softmax_cross_entropy``), input dtype, logit regime and every option
is generated lazily and filtered for valid combinations. CI runs a deterministic slice:
a greedy pairwise cover of the valid product (every feasible pair of option values appears in
some case) filled up with a seeded random sample, plus pinned cases (the known edge cases and a
few ``shard_map`` runs on 8 simulated devices). Environment variables:

- ``JAXCE_MATRIX_CASES=n``: the slice's size (default 200, pinned cases included);
- ``JAXCE_MATRIX_SEED=s``: another deterministic slice;
- ``JAXCE_MATRIX_LOG=path``: append one JSON line per failing case (for triage);
- ``JAXCE_FULL_MATRIX=1``: the whole valid product instead (about 25 million cases, weeks of
  CPU: split it with ``JAXCE_MATRIX_SHARD=i/n``, which keeps every n-th case from the i-th;
  a larger ``JAXCE_MATRIX_CASES`` is the practical middle ground).

Each case compares the loss (every reduction), the aux dict, the gradients with respect to the
logits (x, w and bias for the fused path, soft labels, class and sample weights) with
tolerances from the dtype's rounding, checks the output dtypes, and in float64 checks the
gradient against a central finite difference of the value along a random direction.
"""

import contextlib
import dataclasses
import itertools
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import C, reference  # tests/ is on sys.path (pytest's rootdir insertion)
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxce
from jaxce import _row_sums, _sweeps, _tiles

# ----------------------------------------------------------------------------------------------
# The dimensions of the matrix.

INT_KINDS = ("int8", "uint8", "int16", "uint16", "int32", "int64")
DIMS = {
    "kind": INT_KINDS + ("soft", "nll"),
    "path": ("inplace", "fused"),
    "dtype": ("float16", "bfloat16", "float32", "float64"),
    "regime": ("ordinary", "neginf", "allneginf", "large", "huge"),
    "where": (None, "class", "full", "example"),
    "ignore": (None, -100, 3),
    "labels": ("valid", "impossible", "oor"),
    "ls": (0.0, 0.1),
    "cw": (False, True),
    "sw": (None, "pos", "nan"),
    "zl": (0.0, 0.01),
    # "on": c = 5 / 2e4 for ordinary / large logits (active, not saturating all);
    # "max": c = 2**100 (1.3e30), the largest cap allowed: the identity on these logits
    "cap": (None, "on", "max"),
    "base": (None, 2, 10),
    "reduction": ("none", "sum", "mean"),
    "aux": (False, True),
    "K": (5, 300),
    "x": (None, "random", "identity"),
    "block": (None, 4),
    # "plain": the forms compiled for backends other than XLA:CPU (jaxce._row_sums.CPU_FORMS)
    "forms": ("cpu", "plain"),
}
NAMES = tuple(DIMS)
DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float64": jnp.float64,
}
N = 6  # rows: 0 all -inf, 1 one possible class, 2 label on an impossible class,
#        3 out-of-range label, 4 ignored, 5 fully masked (1 and 5 with a per-example mask)
SHARDED_N, SHARDED_K, MESH = 8, 8, (2, 4)  # (data, model) on 8 simulated devices
DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str = "int32"
    path: str = "inplace"  # or "fused", "sharded", "sharded-fused" (the last two pinned only)
    dtype: str = "float32"
    regime: str = "ordinary"
    where: str | None = None
    ignore: int | None = None
    labels: str = "valid"
    ls: float = 0.0
    cw: bool = False
    sw: str | None = None
    zl: float = 0.0
    cap: str | None = None
    base: float | None = None
    reduction: str = "none"
    aux: bool = False
    K: int = 5
    x: str | None = None
    block: int | None = None
    forms: str = "cpu"

    @property
    def integer(self):
        return self.kind in INT_KINDS

    @property
    def fused(self):
        return self.path in ("fused", "sharded-fused")

    @property
    def sharded(self):
        return self.path.startswith("sharded")

    @property
    def cap_value(self):
        """The softcap: active but not saturating every logit of the regime."""
        if self.cap is None:
            return None
        if self.cap == "max":
            return 2.0**100
        return {"large": 2e4}.get(self.regime, 5.0)

    @property
    def n(self):
        return SHARDED_N if self.sharded else N

    @property
    def k(self):
        return SHARDED_K if self.sharded else self.K

    @property
    def label_dtype(self):
        return (
            np.dtype("int32" if self.kind == "nll" else self.kind) if self.kind != "soft" else None
        )

    @property
    def id(self):
        parts = [self.kind, self.path, self.dtype, self.regime]
        parts += [f"where={self.where}"] if self.where else []
        parts += [f"ignore={self.ignore}"] if self.ignore is not None else []
        parts += [f"labels={self.labels}"] if self.labels != "valid" else []
        parts += [f"ls={self.ls}"] if self.ls else []
        parts += ["cw"] if self.cw else []
        parts += [f"sw={self.sw}"] if self.sw else []
        parts += [f"zl={self.zl}"] if self.zl else []
        parts += [f"cap={self.cap_value:g}"] if self.cap else []
        parts += [f"base={self.base}"] if self.base else []
        parts += [self.reduction]
        parts += ["aux"] if self.aux else []
        parts += [f"K={self.K}"] if self.K != 5 else []
        parts += [f"x={self.x}"] if self.x else []
        parts += [f"block={self.block}"] if self.block else []
        parts += ["plain-forms"] if self.forms == "plain" else []
        return "-".join(parts)


def _signed(kind):
    return kind in INT_KINDS and np.issubdtype(np.dtype(kind), np.signedinteger)


def has_uncounted(c: Case) -> bool:
    """Whether some row is ignored or fully masked (for a NaN sample weight there)."""
    ignored = c.ignore == 3 or (c.ignore == -100 and (_signed(c.kind) or c.kind == "nll"))
    return c.kind != "soft" and ignored or c.where in ("full", "example")


def valid(c: Case) -> bool:
    integer = c.integer
    if c.kind == "int64" and c.dtype != "float64":
        return False  # int64 labels exist only with x64 on
    if c.regime == "huge" and (c.dtype not in ("float32", "float64") or c.kind == "nll"):
        return False  # bf16 / f16 cannot hold 3e38; log-probabilities of -6e38 overflow
    if c.regime == "huge" and c.cap is not None:
        return False  # caps are at most 2**100: they saturate huge logits into exact ties
    if c.kind == "nll" and (c.ls or c.zl or c.cap is not None or c.aux or c.path != "inplace"):
        return False
    if c.kind == "soft" and (c.ignore is not None or c.labels == "oor" or c.path != "inplace"):
        return False
    if c.path == "fused":
        if not integer or c.where not in (None, "class") or c.x is None:
            return False
        if c.regime in ("large", "huge") and c.x != "identity":
            return False
    elif c.path == "inplace" and (c.x is not None or c.block is not None):
        return False
    if c.K != 5 and c.kind not in ("int8", "uint8"):
        return False  # K = 300 probes narrow label dtypes only
    if c.labels == "impossible":
        masked = c.where in ("class", "full") and c.kind != "soft"
        if c.regime not in ("neginf", "allneginf") and not masked:
            return False
    if c.labels == "oor" and not out_of_range_values(c):
        return False
    return not (c.sw == "nan" and not has_uncounted(c))


def out_of_range_values(c: Case):
    """Label values outside [0, K) the label dtype can hold, other than ignore_index."""
    info = np.iinfo(c.label_dtype)
    cands = [-1, -100, c.k, int(info.max)]
    if c.ignore is not None:
        cands.append(c.ignore % (int(info.max) + 1) if info.min == 0 else c.ignore)
    return sorted(
        {v for v in cands if info.min <= v <= info.max and not 0 <= v < c.k and v != c.ignore}
    )


# ----------------------------------------------------------------------------------------------
# The slice: lazy product, pairwise cover, seeded sample, pinned cases.


FREE = ("base", "reduction", "cw", "forms")  # dimensions no validity rule looks at: innermost


def full_product():
    """Every valid case, lazily (about 25 million: for sharded runs, see the module doc)."""
    names = [n for n in NAMES if n not in FREE]
    for values in itertools.product(*(DIMS[n] for n in names)):
        d = dict(zip(names, values))
        if d["path"] == "inplace" and (d["x"] is not None or d["block"] is not None):
            continue
        if d["K"] != 5 and d["kind"] not in ("int8", "uint8"):
            continue
        if not valid(Case(**d)):
            continue
        for free in itertools.product(*(DIMS[n] for n in FREE)):
            yield Case(**d, **dict(zip(FREE, free)))


def _random_valid(rng, count):
    """Valid cases at random, ``count / 8`` of each label kind: for each kind a path allowed
    for it, then the other dimensions uniformly among the valid combinations (so soft labels
    and nll are not outnumbered by the integer kinds' extra options)."""
    sizes = [len(v) for v in DIMS.values()]
    kinds = DIMS["kind"]
    out = []
    for kind_index, kind in enumerate(kinds):
        quota = (count * (kind_index + 1)) // len(kinds) - (count * kind_index) // len(kinds)
        found = 0
        while found < quota:
            idx = np.stack([rng.integers(0, s, size=1024) for s in sizes], axis=1)
            idx[:, 0] = kind_index
            paths = (0, 1) if kind in INT_KINDS else (0,)
            idx[:, 1] = np.asarray(paths)[rng.integers(0, len(paths), size=1024)]
            inplace = idx[:, 1] == 0  # in place: no x, no block size
            idx[inplace, NAMES.index("x")] = 0
            idx[inplace, NAMES.index("block")] = 0
            for row in idx:
                c = Case(**{name: DIMS[name][i] for name, i in zip(NAMES, row)})
                if valid(c):
                    out.append((c, row))
                    found += 1
                    if found == quota:
                        break
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def pairwise_cover(rng, pool_size=6000):
    """Greedy cover of every pair of option values seen in a random pool of valid cases."""
    pool = _random_valid(rng, pool_size)
    cases = [c for c, _ in pool]
    idx = np.stack([r for _, r in pool])
    sizes = [len(v) for v in DIMS.values()]
    offsets, pair_cols = 0, []
    for i, j in itertools.combinations(range(len(sizes)), 2):
        pair_cols.append(offsets + idx[:, i] * sizes[j] + idx[:, j])
        offsets += sizes[i] * sizes[j]
    pairs = np.stack(pair_cols, axis=1)  # [pool, number of dimension pairs]
    wanted = np.zeros(offsets, bool)
    wanted[np.unique(pairs)] = True
    chosen = []
    while wanted.any():
        gain = wanted[pairs].sum(axis=1)
        best = int(np.argmax(gain))
        if gain[best] == 0:
            break
        chosen.append(cases[best])
        wanted[pairs[best]] = False
    return chosen, cases


PINNED = [
    # known edge semantics, one case each (the list), and the narrow-dtype wraps
    Case(kind="int8", K=300, reduction="sum"),
    Case(kind="uint8", K=300, ignore=-100, reduction="mean"),
    Case(kind="uint8", ignore=-100, labels="oor", reduction="none"),
    Case(kind="uint16", ignore=-100, labels="oor", reduction="mean"),
    Case(kind="int8", ignore=3, labels="oor", reduction="none"),
    Case(kind="soft", regime="neginf", cap="on", reduction="none"),
    Case(kind="soft", regime="neginf", labels="impossible", cap="on", ls=0.1, reduction="sum"),
    Case(kind="int32", regime="allneginf", reduction="none", aux=True),
    Case(kind="soft", regime="allneginf", reduction="mean", aux=True, zl=0.01),
    Case(kind="int32", regime="neginf", labels="impossible", reduction="none", zl=0.01),
    Case(kind="int32", where="example", zl=0.01, aux=True, reduction="mean"),
    Case(kind="soft", where="full", zl=0.01, aux=True, reduction="none"),
    Case(kind="int32", ignore=-100, sw="nan", reduction="mean"),
    Case(kind="soft", where="example", sw="nan", reduction="sum"),
    Case(kind="nll", where="full", sw="nan", ignore=3, reduction="mean", cw=True),
    Case(kind="nll", labels="oor", reduction="none"),
    Case(kind="int32", path="fused", x="random", labels="oor", reduction="mean"),
    Case(kind="int32", path="fused", x="random", regime="allneginf", block=4, reduction="mean"),
    Case(kind="int64", dtype="float64", regime="huge", zl=0.01, reduction="none"),
    Case(kind="int32", dtype="float32", regime="large", ls=0.1, zl=0.01, reduction="mean"),
    Case(
        kind="int32",
        dtype="bfloat16",
        cw=True,
        sw="pos",
        ls=0.1,
        zl=0.01,
        cap="on",
        base=2,
        reduction="mean",
        aux=True,
    ),
    # the other backends' forms on the edge regimes (no lax.cond, no row blocks)
    Case(kind="int32", dtype="bfloat16", regime="neginf", labels="impossible", ls=0.1,
         reduction="none", forms="plain"),
    Case(kind="soft", regime="allneginf", cap="on", ls=0.1, reduction="sum", forms="plain"),
    Case(kind="int32", regime="large", ls=0.1, zl=0.01, reduction="mean", forms="plain"),
    Case(kind="int32", path="fused", x="random", regime="neginf", block=4, ls=0.1,
         reduction="mean", forms="plain"),
    Case(kind="int32", path="sharded", regime="neginf", ls=0.1, reduction="mean",
         forms="plain"),
    # shard_map on a 2 x 4 (data x model) mesh of simulated devices
    Case(
        kind="int32",
        path="sharded",
        ignore=-100,
        ls=0.1,
        cw=True,
        sw="pos",
        zl=0.01,
        cap="on",
        reduction="mean",
        aux=True,
    ),
    Case(
        kind="int32",
        path="sharded",
        regime="neginf",
        where="class",
        labels="impossible",
        reduction="none",
        aux=True,
    ),
    Case(
        kind="int32",
        path="sharded",
        dtype="bfloat16",
        regime="allneginf",
        where="example",
        zl=0.01,
        base=10,
        reduction="sum",
        aux=True,
    ),
    Case(
        kind="soft",
        path="sharded",
        regime="neginf",
        where="full",
        ls=0.1,
        cw=True,
        sw="nan",
        cap="on",
        reduction="mean",
        aux=True,
    ),
    Case(kind="soft", path="sharded", regime="large", zl=0.01, reduction="none"),
    Case(
        kind="int32",
        path="sharded-fused",
        x="random",
        where="class",
        ignore=3,
        ls=0.1,
        sw="pos",
        zl=0.01,
        reduction="mean",
        block=4,
    ),
    Case(
        kind="int32",
        path="sharded-fused",
        x="random",
        regime="neginf",
        labels="oor",
        reduction="none",
        aux=True,
    ),
]


def ci_slice(total, seed):
    rng = np.random.default_rng(seed)
    cover, pool = pairwise_cover(rng)
    chosen = list(dict.fromkeys(PINNED + cover))
    extra = [c for c in pool if c not in set(chosen)]
    order = rng.permutation(len(extra))
    for i in order:
        if len(chosen) >= total:
            break
        chosen.append(extra[i])
    return chosen


def selected_cases():
    if os.environ.get("JAXCE_FULL_MATRIX") == "1":
        cases = full_product()
        shard = os.environ.get("JAXCE_MATRIX_SHARD")
        if shard:
            i, n = (int(a) for a in shard.split("/"))
            cases = itertools.islice(cases, i, None, n)
        return itertools.chain(PINNED, cases)
    total = int(os.environ.get("JAXCE_MATRIX_CASES", "200"))
    seed = int(os.environ.get("JAXCE_MATRIX_SEED", "0"))
    return ci_slice(total, seed)


# ----------------------------------------------------------------------------------------------
# Inputs of one case (a seed from its id: every run draws the same numbers).


def _round(a, dtype):
    """Round a float64 array to ``dtype`` and back: the values the library sees."""
    return np.asarray(np.asarray(a, np.float64).astype(DTYPES[dtype]), np.float64)


def make_inputs(c: Case):
    rng = np.random.default_rng(zlib.crc32(c.id.encode()))
    n, k = c.n, c.k
    a = {}
    # logits (or the finite part the fused path builds from x @ w + bias)
    base_z = {
        "ordinary": 3.0 * rng.standard_normal((n, k)),
        "neginf": 3.0 * rng.standard_normal((n, k)),
        "allneginf": 3.0 * rng.standard_normal((n, k)),
        "large": rng.uniform(-1e4, 1e4, (n, k)),
        "huge": rng.uniform(-3e38, 3e38, (n, k)),
    }[c.regime]
    neginf = np.zeros((n, k), bool)
    if c.fused:
        # -inf logits come from -inf bias entries: whole classes impossible
        bias = 0.5 * rng.standard_normal(k) if c.x == "random" else np.zeros(k)
        if c.regime == "neginf":  # (not on ignore_index 3: row 2 may need a label there)
            cols = [v for v in range(k) if v != c.ignore]
            bias[rng.choice(cols, size=max(1, k // 5), replace=False)] = -np.inf
        elif c.regime == "allneginf":
            bias[:] = -np.inf
        if c.x == "identity":
            d = n
            x = np.eye(n)
            w = base_z
        else:
            d = 4
            x = rng.standard_normal((n, d))
            w = 1.5 * rng.standard_normal((d, k))
        a["x"], a["w"], a["bias"] = _round(x, c.dtype), _round(w, c.dtype), _round(bias, c.dtype)
        z = a["x"] @ a["w"] + a["bias"]
        neginf = np.broadcast_to(np.isneginf(a["bias"]), (n, k)).copy()
        a["logit_error"] = (
            (2.0**-24 if c.dtype != "float64" else 2.0**-53) * C * (np.abs(a["x"]) @ np.abs(a["w"]))
        )
    else:
        z = base_z.copy()
        if c.regime in ("neginf", "allneginf"):
            for r in range(n):
                if rng.random() < 0.8 or r == 2:
                    cols = rng.choice(k, size=max(1, k // 5), replace=False)
                    neginf[r, cols] = True
            if c.regime == "allneginf":
                neginf[0] = True
                neginf[1] = True
                neginf[1, rng.integers(k)] = False
        if c.labels == "oor" and c.regime != "huge":
            z[3] -= z[3].max() + 1.0  # row 3 (out-of-range label): every logit negative
        z[neginf] = -np.inf
        z = _round(z, c.dtype)
    # where
    mask = np.ones((n, k), bool)
    where = None
    if c.where == "class":
        classes = np.ones(k, bool)
        classes[[1] if k == 5 else [1, 100, k - 1] if k == 300 else [1, k - 2]] = False
        where, mask = classes, np.broadcast_to(classes, (n, k)).copy()
    elif c.where == "full":
        mask = rng.random((n, k)) > 0.2
        mask[5] = False
        where = mask
    elif c.where == "example":
        rows = np.ones(n, bool)
        rows[[1, 5]] = False
        where, mask = rows, np.broadcast_to(rows[:, None], (n, k)).copy()
    if c.kind == "nll":
        # log-probabilities: the log-softmax of the logits over the finite ones, in float64
        zz = np.where(np.isneginf(z), -np.inf, z)
        mx = np.max(np.where(np.isneginf(zz), -np.inf, zz), axis=1, keepdims=True)
        mx = np.where(np.isfinite(mx), mx, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse = mx + np.log(np.sum(np.exp(zz - mx), axis=1, keepdims=True))
            z = _round(np.where(np.isneginf(zz), -np.inf, zz - lse), c.dtype)
    if c.labels == "impossible" and c.kind != "soft":
        # row 2 needs an impossible class that is not ignore_index (and a label dtype can hold)
        top = min(k, int(np.iinfo(c.label_dtype).max) + 1)
        if not any(v != c.ignore for v in np.flatnonzero(np.isneginf(z[2, :top]) | ~mask[2, :top])):
            j = rng.choice([v for v in range(top) if v != c.ignore])
            if c.where == "full":
                mask[2, j] = False
            elif c.fused:
                raise AssertionError(f"{c.id}: no impossible class to put a label on")
            else:
                z[2, j] = -np.inf
    possible = mask & ~np.isneginf(z)
    a["z"], a["mask"], a["where"], a["possible"] = z, mask, where, possible

    # labels
    if c.kind == "soft":
        y = np.zeros((n, k))
        for r in range(n):
            support = np.flatnonzero(possible[r]) if possible[r].any() else np.arange(k)
            if c.regime == "allneginf" and r == 0:
                support = np.arange(k)  # every class impossible: positive mass on them
            y[r, support] = rng.dirichlet(np.ones(len(support)))
            if len(support) > 2 and rng.random() < 0.3:
                y[r, rng.choice(support)] = 0.0
                y[r] /= y[r].sum()
        if c.labels == "impossible":
            imp = np.flatnonzero(np.isneginf(z[2]))
            y[2] *= 0.7
            y[2, rng.choice(imp)] += 0.3
        a["labels"] = _round(y, c.dtype)
    else:
        info = np.iinfo(c.label_dtype)
        top = min(k, int(info.max) + 1)
        y = np.zeros(n, np.int64)
        for r in range(n):
            choices = np.flatnonzero(possible[r, :top])
            if c.ignore == 3 and r != 4:  # keep the ignored rows to row 4 where possible
                choices = [v for v in choices if v != 3] or choices
            y[r] = (
                rng.choice(choices)
                if len(choices)
                else rng.choice([v for v in range(top) if v != c.ignore])
            )
        if c.labels == "impossible":
            imp = [v for v in np.flatnonzero(~possible[2, :top]) if v != c.ignore]
            y[2] = rng.choice(imp)
        if c.labels == "oor":
            cands = out_of_range_values(c)
            wrap = [
                v
                for v in cands
                if c.ignore is not None and info.min == 0 and v == c.ignore % (int(info.max) + 1)
            ]
            y[3] = wrap[0] if wrap else rng.choice(cands)
        if c.ignore == 3:
            y[4] = 3
        elif c.ignore == -100 and info.min < 0:
            y[4] = -100
        a["labels"] = y.astype(c.label_dtype)
    # weights and cotangent
    wdtype = "float64" if c.dtype == "float64" else "float32"
    a["class_weights"] = _round(rng.uniform(0.5, 2.0, k), wdtype) if c.cw else None
    if c.sw:
        sw = _round(rng.uniform(0.5, 2.0, n), wdtype)
        if c.sw == "nan":
            ref_counted = reference_counted(c, a)
            sw[~ref_counted] = np.nan
        a["sample_weights"] = sw
    else:
        a["sample_weights"] = None
    a["cotangent"] = _round(rng.standard_normal(n), wdtype) if c.reduction == "none" else None
    return a


def reference_counted(c, a):
    held = a["mask"].any(axis=1)
    if c.kind == "soft" or c.ignore is None:
        return held
    return held & (a["labels"].astype(np.int64) != c.ignore)


# ----------------------------------------------------------------------------------------------
# Running jaxce on one case: value, aux and the vjp, in one jitted function.


def _options(c: Case):
    kw = {"reduction": c.reduction}
    if c.kind != "soft" and c.ignore is not None:
        kw["ignore_index"] = c.ignore
    if c.kind != "nll":
        if c.ls:
            kw["label_smoothing"] = c.ls
        if c.zl:
            kw["z_loss"] = c.zl
        if c.cap is not None:
            kw["logit_softcap"] = c.cap_value
        if c.aux:
            kw["return_aux"] = True
    if c.base is not None:
        kw["base"] = c.base
    if c.fused and c.block is not None:
        kw["block_size"] = c.block
    return kw


def _loss(c: Case, diff, rest, axes=None):
    """The jaxce call on (local) arrays; returns (loss, aux or None)."""
    kw = _options(c)
    if axes is not None:
        kw.update(axes)
    if rest.get("where") is not None:
        kw["where"] = rest["where"]
    for name in ("class_weights", "sample_weights"):
        if name in diff:
            kw[name] = diff[name]
    if c.fused:
        out = jaxce.linear_softmax_cross_entropy(
            diff["x"], diff["w"], rest["labels"], bias=diff["bias"], **kw
        )
    elif c.kind == "soft":
        out = jaxce.softmax_cross_entropy(diff["logits"], diff["labels"], **kw)
    elif c.kind == "nll":
        out = jaxce.nll_loss(diff["logits"], rest["labels"], **kw)
    else:
        out = jaxce.softmax_cross_entropy_with_integer_labels(diff["logits"], rest["labels"], **kw)
    return out if c.aux else (out, None)


def _specs(c: Case, tree):
    spec = {
        "logits": P(DATA, MODEL),
        "x": P(DATA),
        "w": P(None, MODEL),
        "bias": P(MODEL),
        "class_weights": P(MODEL),
        "sample_weights": P(DATA),
        "labels": P(DATA, MODEL) if c.kind == "soft" else P(DATA),
        "where": {"class": P(MODEL), "full": P(DATA, MODEL), "example": P(DATA), None: None}[
            c.where
        ],
    }
    return {name: spec[name] for name in tree}


def build(c: Case, a):
    """(diff, rest, jitted run(diff) -> (loss, aux, grads, scalar))."""
    dt = DTYPES[c.dtype]
    diff = {}
    if c.fused:
        for name in ("x", "w", "bias"):
            diff[name] = jnp.asarray(a[name], dt)
    else:
        diff["logits"] = jnp.asarray(a["z"], dt)
    if c.kind == "soft":
        diff["labels"] = jnp.asarray(a["labels"], dt)
    for name in ("class_weights", "sample_weights"):
        if a[name] is not None:
            diff[name] = jnp.asarray(a[name])
    rest = {"labels": jnp.asarray(a["labels"])} if c.kind != "soft" else {}
    if a["where"] is not None:
        rest["where"] = jnp.asarray(a["where"])
    out_dtype = jnp.float64 if c.dtype == "float64" else jnp.float32
    cot = (
        jnp.asarray(a["cotangent"], out_dtype) if c.reduction == "none" else jnp.ones((), out_dtype)
    )

    if c.sharded:
        mesh = Mesh(np.array(jax.devices()[:8]).reshape(MESH), (DATA, MODEL))
        row = P(DATA)
        out_spec = row if c.reduction == "none" else P()
        aux_spec = {"logsumexp": row, "z_loss": row}
        if c.integer:
            aux_spec["correct"] = row

        def loss_fn(diff):
            def local(diff, rest):
                return _loss(
                    c, diff, rest, axes={"class_axis_name": MODEL, "batch_axis_name": DATA}
                )

            return jax.shard_map(
                local,
                mesh=mesh,
                in_specs=(_specs(c, diff), _specs(c, rest)),
                out_specs=(out_spec, aux_spec if c.aux else None),
            )(diff, rest)
    else:

        def loss_fn(diff):
            return _loss(c, diff, rest)

    def run(diff):
        out, vjp, aux = jax.vjp(loss_fn, diff, has_aux=True)
        (grads,) = vjp(cot)
        scalar = jnp.sum(out * cot) if c.reduction == "none" else out
        return out, aux, grads, scalar

    return diff, jax.jit(run)


# ----------------------------------------------------------------------------------------------
# Comparison.


def compare(errors, what, actual, expected, atol, rtol, checked=None, overflow=None):
    """Append a message to ``errors`` unless ``actual`` matches ``expected`` elementwise.

    NaN must meet NaN, +-inf the same infinity, finite values |a - e| <= atol + rtol |e|.
    ``overflow``: magnitude beyond which an infinity of the right sign is also accepted (a sum
    of finite float32 losses may overflow). ``checked``: a boolean array of entries to compare.
    """
    act = np.asarray(np.asarray(actual).astype(np.float64))
    exp = np.broadcast_to(np.asarray(expected, np.float64), act.shape)
    atol = np.broadcast_to(np.asarray(atol, np.float64), act.shape)
    if act.shape != np.shape(expected) and np.shape(expected) != ():
        errors.append(f"{what}: shape {act.shape}, expected {np.shape(expected)}")
        return
    with np.errstate(all="ignore"):
        ok = np.where(
            np.isnan(exp),
            np.isnan(act),
            np.where(
                np.isinf(exp),
                act == exp,
                np.isfinite(act) & (np.abs(act - exp) <= atol + rtol * np.abs(exp)),
            ),
        )
        if overflow is not None:
            ok |= (np.abs(exp) >= overflow) & np.isinf(act) & (np.sign(act) == np.sign(exp))
    if checked is not None:
        ok |= ~np.broadcast_to(checked, act.shape)
    if not ok.all():
        bad = np.argwhere(~ok) if act.ndim else [()]
        lines = []
        for i in list(bad)[:4]:
            i = tuple(i)
            lines.append(
                f"  [{','.join(map(str, i))}] expected {exp[i]!r} (atol {atol[i]:.3g}),"
                f" got {act[i]!r}"
            )
        more = f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
        errors.append(
            f"{what}: {int((~ok).sum())} of {ok.size} entries differ{more}\n" + "\n".join(lines)
        )


def check_case(c: Case):
    a = make_inputs(c)
    x64 = c.dtype == "float64"
    eps_c = 2.0**-53 if x64 else 2.0**-24
    out_dtype = np.float64 if x64 else np.float32
    gdt = np.dtype(DTYPES[c.dtype])
    eps_out = float(jnp.finfo(gdt).eps)  # one ulp of the gradients' dtype
    # XLA on CPU flushes float32 / float64 subnormals to zero (float16 keeps them)
    tiny_out = float(
        jnp.finfo(gdt).smallest_subnormal
        if gdt == np.float16
        else jnp.finfo(np.float64 if x64 else np.float32).tiny
    )
    g_overflow = float(jnp.finfo(gdt).max) * (1 - eps_out)  # beyond it, +-inf is the rounding
    ref = reference(
        a["z"],
        a["labels"],
        integer=c.kind != "soft",
        nll=c.kind == "nll",
        mask=a["mask"],
        class_weights=a["class_weights"],
        sample_weights=a["sample_weights"],
        label_smoothing=c.ls,
        z_loss=c.zl,
        cap=c.cap_value,
        base=c.base,
        reduction=c.reduction,
        ignore_index=c.ignore,
        cotangent=a["cotangent"],
        eps=eps_c,
        logit_error=a.get("logit_error"),
    )
    errors = []
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
        diff, run = build(c, a)
        out, aux, grads, scalar = run(diff)
        out, grads = jax.device_get(out), jax.device_get(grads)
        aux = jax.device_get(aux)

        # --- value --------------------------------------------------------------------------
        if out.dtype != out_dtype:
            errors.append(f"loss dtype {out.dtype}, expected {np.dtype(out_dtype)}")
        overflow = float(np.finfo(out_dtype).max) / 64
        compare(errors, "loss", out, ref["value"], ref["value_atol"], 4 * eps_c, overflow=overflow)

        # --- aux ----------------------------------------------------------------------------
        if c.aux:
            keys = {"logsumexp", "z_loss"} | ({"correct"} if c.integer else set())
            if set(aux) != keys:
                errors.append(f"aux keys {sorted(aux)}, expected {sorted(keys)}")
            else:
                for name in ("logsumexp", "z_loss"):
                    if aux[name].dtype != out_dtype:
                        errors.append(f"aux {name} dtype {aux[name].dtype}")
                compare(
                    errors,
                    "aux logsumexp",
                    aux["logsumexp"],
                    ref["aux_lse"],
                    ref["aux_lse_atol"],
                    4 * eps_c,
                    overflow=overflow,
                )
                compare(
                    errors,
                    "aux z_loss",
                    aux["z_loss"],
                    ref["aux_z"],
                    ref["aux_z_atol"],
                    4 * eps_c,
                    overflow=overflow,
                )
                if c.integer:
                    if aux["correct"].dtype != np.bool_:
                        errors.append(f"aux correct dtype {aux['correct'].dtype}")
                    compare(
                        errors,
                        "aux correct",
                        aux["correct"],
                        ref["correct"],
                        0,
                        0,
                        checked=ref["correct_checked"],
                    )

        # --- gradients ----------------------------------------------------------------------
        for name, g in grads.items():
            want = np.dtype(diff[name].dtype)
            if g.dtype != want:
                errors.append(f"d{name} dtype {g.dtype}, expected {want}")
        dz, dz_atol = ref["dz"], ref["dz_atol"]
        if c.fused:
            x, w = a["x"], a["w"]
            dzr = np.where(np.isfinite(dz), np.abs(dz), 0.0)
            dz_tol = dz_atol + eps_out * dzr  # dz rounded to the inputs' dtype for the matmuls
            with np.errstate(all="ignore"):
                compare(
                    errors,
                    "dx",
                    grads["x"],
                    dz @ w.T,
                    dz_tol @ np.abs(w).T + C * eps_c * (dzr @ np.abs(w).T) + tiny_out,
                    eps_out,
                    overflow=g_overflow,
                )
                compare(
                    errors,
                    "dw",
                    grads["w"],
                    x.T @ dz,
                    np.abs(x).T @ dz_tol + C * eps_c * (np.abs(x).T @ dzr) + tiny_out,
                    eps_out,
                    overflow=g_overflow,
                )
                compare(
                    errors,
                    "dbias",
                    grads["bias"],
                    dz.sum(axis=0),
                    dz_tol.sum(axis=0) + C * eps_c * dzr.sum(axis=0) + tiny_out,
                    eps_out,
                    overflow=g_overflow,
                )
        else:
            compare(
                errors,
                "dlogits",
                grads["logits"],
                dz,
                dz_atol + tiny_out,
                eps_out,
                overflow=g_overflow,
            )
        if c.kind == "soft":
            compare(
                errors,
                "dlabels",
                grads["labels"],
                ref["dlabels"],
                ref["dlabels_atol"] + tiny_out,
                eps_out,
                checked=ref["dlabels_checked"],
                overflow=g_overflow,
            )
        counted_losses = np.where(ref["counted"], ref["loss_none"], 0.0)
        # weight gradients multiply losses by O(1) factors: meaningful when every counted loss
        # is finite, and not for float32 losses of 1e38 (their products overflow on the way)
        weights_comparable = np.all(np.isfinite(counted_losses)) and (x64 or c.regime != "huge")
        if weights_comparable:
            if "sample_weights" in grads:
                compare(
                    errors,
                    "dsample_weights",
                    grads["sample_weights"],
                    ref["dsw"],
                    ref["dsw_atol"],
                    4 * eps_c,
                )
            if "class_weights" in grads:
                compare(
                    errors,
                    "dclass_weights",
                    grads["class_weights"],
                    ref["dcw"],
                    ref["dcw_atol"],
                    4 * eps_c,
                )

        # --- value and gradient agree: a central difference in float64 --------------------
        # (wherever value and gradients are finite; soft labels move only on possible classes)
        finite = np.isfinite(float(scalar)) and all(
            np.all(np.isfinite(np.asarray(g))) for g in grads.values()
        )
        if x64 and c.regime in ("ordinary", "neginf", "allneginf") and finite and not errors:
            rng = np.random.default_rng(1)
            direction = {
                k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in diff.items()
            }
            if "labels" in direction:
                direction["labels"] = jnp.where(a["possible"], direction["labels"], 0.0)
            h = 1e-6
            plus = run(jax.tree.map(lambda v, d: v + h * d, diff, direction))[3]
            minus = run(jax.tree.map(lambda v, d: v - h * d, diff, direction))[3]
            fd = (float(plus) - float(minus)) / (2 * h)
            terms = [
                np.where(
                    np.isnan(np.asarray(diff[k])),
                    0.0,
                    np.asarray(grads[k]) * np.asarray(direction[k]),
                )
                for k in diff
            ]
            dot = float(sum(t.sum() for t in terms))
            scale = float(sum(np.abs(t).sum() for t in terms))
            if not abs(fd - dot) <= 1e-6 * (1.0 + scale):
                errors.append(f"finite difference {fd!r} != <grad, direction> {dot!r}")
    return errors, a, ref, out


CASES = selected_cases()


@contextlib.contextmanager
def forms(cpu: bool):
    """XLA:CPU's forms (``cpu``) or the other backends' (see ``jaxce._row_sums.xla_cpu_form``).

    XLA:CPU's forms sum rows in chunks of at most 4 classes here (``ROW_CHUNK``, 32768 in
    use), so that both K (5: chunks of 1; 300: of 4) take the chunked sums; and the fused loss
    takes tiles of 4 columns (a ragged last one at K=5, 75 at K=300) for its statistics and
    gradients. The other forms keep the default tiles (one at these K) and, with a scalar
    reduction, take the gradients in the statistics' sweep over blocks of rows."""
    saved = (_row_sums.CPU_FORMS, _row_sums.ROW_CHUNK, _tiles.TILE_BYTES, _tiles.MIN_TILE_COLUMNS,
             _sweeps.FUSED_MIN_ROWS)
    _row_sums.CPU_FORMS, _row_sums.ROW_CHUNK = cpu, 4
    if cpu:
        _tiles.TILE_BYTES, _tiles.MIN_TILE_COLUMNS, _sweeps.FUSED_MIN_ROWS = 1, 4, 2**30
    try:
        yield
    finally:
        (_row_sums.CPU_FORMS, _row_sums.ROW_CHUNK, _tiles.TILE_BYTES, _tiles.MIN_TILE_COLUMNS,
         _sweeps.FUSED_MIN_ROWS) = saved


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matrix(case):
    log = os.environ.get("JAXCE_MATRIX_LOG")  # one JSON line per failing case, for triage
    try:
        with forms(case.forms == "cpu"):
            errors, a, _, _ = check_case(case)
    except Exception as e:
        if log:
            with open(log, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "id": case.id,
                            "case": dataclasses.asdict(case),
                            "errors": [f"exception: {type(e).__name__}: {e}"],
                        }
                    )
                    + "\n"
                )
        raise
    if errors and log:
        with open(log, "a") as f:
            f.write(
                json.dumps({"id": case.id, "case": dataclasses.asdict(case), "errors": errors})
                + "\n"
            )
    if errors:
        inputs = {k: v for k, v in a.items() if k not in ("possible", "logit_error", "mask")}
        pytest.fail(f"{case.id}\n" + "\n".join(errors) + f"\ninputs: {inputs!r}", pytrace=False)


# ----------------------------------------------------------------------------------------------
# Batches where nothing counts: empty, every example ignored, every example masked. "mean" is
# 0 (README: "0 when none counts"), "sum" 0, gradients 0 of the inputs' shapes and dtypes.

NOTHING = [
    (kind, batch, reduction)
    for kind in ("int32", "uint8", "soft", "nll", "fused")
    for batch in ("empty", "ignored", "masked")
    for reduction in ("none", "sum", "mean")
    if not (kind == "soft" and batch == "ignored")
    and not (kind == "fused" and batch == "masked")  # fused `where` is a class mask
    and not (kind == "uint8" and batch != "ignored")
]


@pytest.mark.parametrize("kind,batch,reduction", NOTHING, ids=lambda v: str(v))
def test_nothing_counts(kind, batch, reduction):
    n, k = (0 if batch == "empty" else 3), 4
    rng = np.random.default_rng(0)
    z = jnp.asarray(3 * rng.standard_normal((n, k)), jnp.bfloat16)
    kw = {"reduction": reduction}
    if batch == "ignored":
        kw["ignore_index"] = 3 if kind == "uint8" else -100
    if batch == "masked":
        kw["where"] = jnp.zeros((n,), bool)
    labels = np.full(n, kw.get("ignore_index", 1), np.int64).astype(
        "uint8" if kind == "uint8" else "int32"
    )
    sw = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    if batch != "empty":
        sw = sw.at[0].set(jnp.nan)  # uncounted: takes no part

    def loss(z, sw):
        if kind == "fused":
            return jaxce.linear_softmax_cross_entropy(
                z, jnp.eye(k, dtype=z.dtype), labels, sample_weights=sw, block_size=2, **kw
            )
        if kind == "soft":
            y = jnp.full((n, k), 1.0 / k, z.dtype)
            return jaxce.softmax_cross_entropy(z, y, sample_weights=sw, z_loss=0.01, **kw)
        if kind == "nll":
            return jaxce.nll_loss(jax.nn.log_softmax(z), labels, sample_weights=sw, **kw)
        return jaxce.softmax_cross_entropy_with_integer_labels(
            z, labels, sample_weights=sw, label_smoothing=0.1, z_loss=0.01, **kw
        )

    out, vjp = jax.vjp(loss, z, sw)
    dz, dsw = vjp(jnp.ones_like(out))
    assert out.dtype == jnp.float32 and out.shape == ((n,) if reduction == "none" else ())
    np.testing.assert_array_equal(np.asarray(out), 0.0, err_msg="loss")
    assert dz.dtype == z.dtype and dz.shape == z.shape
    np.testing.assert_array_equal(np.asarray(dz, np.float32), 0.0, err_msg="dlogits")
    assert dsw.dtype == sw.dtype and dsw.shape == sw.shape
    np.testing.assert_array_equal(np.asarray(dsw), 0.0, err_msg="dsample_weights")
