"""The static options of a softmax cross-entropy (``Spec``) and the class axis they name:
collectives that are no-ops on one device, and the mesh axes an operand varies over."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Spec(NamedTuple):
    """The static options of a softmax cross-entropy (hashable: a ``nondiff_argnum``).

    The label kind: integer class ids (``integer_labels``), k weighted class ids per example
    (``sparse_labels``: :class:`SparseLabels`), or else distributions over the classes.
    """

    integer_labels: bool
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    logit_softcap: float | None = None
    class_axis_name: Any = None
    sparse_labels: bool = False


class SparseLabels(NamedTuple):
    """Sparse labels: k (class id, weight) entries per example, each of shape [..., k].

    They stand for the distribution that adds weight ``weights[..., j]`` to class
    ``indices[..., j]`` (duplicates add up); an entry of weight 0 takes no part, whatever its
    index.
    """

    indices: jax.Array  # int32 global class ids
    weights: jax.Array  # floating, in the compute dtype


# ----------------------------------------------------------------------------------------------
# Collectives: no-ops on one device, pmax / psum over the class axis when it is sharded.


def class_sum(x: jax.Array, spec: Spec) -> jax.Array:
    return x if spec.class_axis_name is None else lax.psum(x, spec.class_axis_name)


def class_max(x: jax.Array, spec: Spec) -> jax.Array:
    return x if spec.class_axis_name is None else lax.pmax(x, spec.class_axis_name)


def class_shards(spec: Spec) -> int:
    return 1 if spec.class_axis_name is None else lax.axis_size(spec.class_axis_name)


def class_offset(num_local: int, spec: Spec):
    """Global id of the first local class: shard i holds the contiguous slice i*K_local + [0, K_local)."""
    if spec.class_axis_name is None:
        return 0
    return lax.axis_index(spec.class_axis_name) * num_local


def class_ids(num_local: int, spec: Spec, columns=None) -> jax.Array:
    """Global ids of the ``num_local`` classes held: all the local ones, or with ``columns =
    (start, total)`` the local classes ``[start, start + num_local)`` of ``total``."""
    if columns is None:
        return lax.iota(jnp.int32, num_local) + class_offset(num_local, spec)
    start, total = columns
    return lax.iota(jnp.int32, num_local) + (start + class_offset(total, spec))


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
    return aval_varying_axes(jax.typeof(x))


def aval_varying_axes(aval) -> frozenset:
    """:func:`varying_axes` of an abstract value (a symbolic zero cotangent's ``aval``)."""
    mat = getattr(aval, "mat", None)  # jax >= 0.9 names it aval.mat.varying, earlier aval.vma
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


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
