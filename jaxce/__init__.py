"""jaxce: numerically stable softmax, information measures and cross-entropy losses for JAX."""

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
from ._information import cross_entropy as cross_entropy
from ._information import entropy as entropy
from ._information import information as information
from ._information import kl_divergence as kl_divergence
from ._information import softmax_entropy as softmax_entropy
from ._information import softmax_kl_divergence as softmax_kl_divergence
from ._linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
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
    "linear_softmax_cross_entropy",
    "log_softmax",
    "logsumexp",
    "losses",
    "nll_loss",
    "sigmoid_binary_cross_entropy",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_hvp",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_entropy",
    "softmax_jacobian",
    "softmax_kl_divergence",
]
