"""jaxce: numerically stable softmax, information measures and cross-entropy losses for JAX.

``import jaxce`` loads no module below, nor JAX: each public name is imported from its home
on first access (PEP 562), so that ``jaxce-train --help`` answers before JAX loads.
"""

import importlib
import typing

if typing.TYPE_CHECKING:  # the same names, statically, for type checkers and the docs
    from . import losses as losses  # optax.losses' names and signatures, over the kernels below
    from ._binary import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
    from ._checked import CheckError as CheckError
    from ._checked import checked as checked
    from ._cross_entropy import nll_loss as nll_loss
    from ._cross_entropy import softmax_cross_entropy as softmax_cross_entropy
    from ._cross_entropy import softmax_cross_entropy_hvp as softmax_cross_entropy_hvp
    from ._cross_entropy import (
        softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
    )
    from ._cross_entropy import (
        softmax_cross_entropy_with_sparse_labels as softmax_cross_entropy_with_sparse_labels,
    )
    from ._divergence import softmax_divergence as softmax_divergence
    from ._information import cross_entropy as cross_entropy
    from ._information import entropy as entropy
    from ._information import information as information
    from ._information import kl_divergence as kl_divergence
    from ._information import softmax_entropy as softmax_entropy
    from ._information import softmax_kl_divergence as softmax_kl_divergence
    from ._linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
    from ._linear_divergence import linear_softmax_divergence as linear_softmax_divergence
    from ._linear_log_probs import linear_label_log_probs as linear_label_log_probs
    from ._log_probs import label_log_probs as label_log_probs
    from ._softmax import log_softmax as log_softmax
    from ._softmax import logsumexp as logsumexp
    from ._softmax import softmax as softmax
    from ._softmax import softmax_jacobian as softmax_jacobian

__version__ = "0.1.0"

__all__ = [
    "CheckError",
    "checked",
    "cross_entropy",
    "entropy",
    "information",
    "kl_divergence",
    "label_log_probs",
    "linear_label_log_probs",
    "linear_softmax_cross_entropy",
    "linear_softmax_divergence",
    "log_softmax",
    "logsumexp",
    "losses",
    "nll_loss",
    "sigmoid_binary_cross_entropy",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_hvp",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_cross_entropy_with_sparse_labels",
    "softmax_divergence",
    "softmax_entropy",
    "softmax_jacobian",
    "softmax_kl_divergence",
]

# Each public name and the module that defines it (``losses`` is that module itself).
_HOMES = {
    "CheckError": "_checked",
    "checked": "_checked",
    "cross_entropy": "_information",
    "entropy": "_information",
    "information": "_information",
    "kl_divergence": "_information",
    "softmax_entropy": "_information",
    "softmax_kl_divergence": "_information",
    "linear_softmax_cross_entropy": "_linear",
    "linear_softmax_divergence": "_linear_divergence",
    "softmax_divergence": "_divergence",
    "label_log_probs": "_log_probs",
    "linear_label_log_probs": "_linear_log_probs",
    "nll_loss": "_cross_entropy",
    "sigmoid_binary_cross_entropy": "_binary",
    "softmax_cross_entropy": "_cross_entropy",
    "softmax_cross_entropy_hvp": "_cross_entropy",
    "softmax_cross_entropy_with_integer_labels": "_cross_entropy",
    "softmax_cross_entropy_with_sparse_labels": "_cross_entropy",
    "log_softmax": "_softmax",
    "logsumexp": "_softmax",
    "softmax": "_softmax",
    "softmax_jacobian": "_softmax",
    "losses": "losses",
}


def __getattr__(name: str) -> typing.Any:
    """Imports a public name's module on first access and keeps the name in this module."""
    try:
        home = _HOMES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = importlib.import_module(f".{home}", __name__)
    value = module if home == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, the dunders, and the package's own submodules once imported (not the
    standard-library modules this file uses)."""
    own = {
        name for name, value in globals().items()
        if name.startswith("__") or getattr(value, "__name__", "").startswith(f"{__name__}.")
    }
    return sorted(own | set(__all__))
