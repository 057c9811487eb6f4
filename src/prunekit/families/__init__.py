"""Compression families as types: a typed config per family, one handler per config type.

``prunekit.compress(model, config)`` dispatches by the config's type (the torchao
``quantize_(model, config)`` shape): :class:`SparseConfig` (single weights zeroed, unstructured or
N:M), :class:`StructuredConfig` (whole units removed, the model shrinks), :class:`LowRankConfig`
(matrices factorized, a rank budget), :class:`ActivationSparsityConfig` (thresholds on activations,
installed on the model; the weights are left as they are). :class:`~prunekit.config.PruneConfig` is the
flat, compatible front of the three weight families: ``PruneConfig.family()`` is its typed config.
"""

from .activation import ActivationFamily, ActivationSparsityConfig, activation_report
from .base import HANDLERS, Family, FamilyConfig, compress, prepare, select_linears
from .lowrank import LowRankConfig, LowRankFamily
from .sparse import SparseConfig, SparseFamily
from .structured import STRUCTURED_ALLOCATIONS, StructuredConfig, StructuredFamily, allocation_names
from .front import to_family

__all__ = ["ActivationFamily", "ActivationSparsityConfig", "HANDLERS", "STRUCTURED_ALLOCATIONS", "Family", "FamilyConfig",
           "LowRankConfig", "LowRankFamily", "SparseConfig", "SparseFamily", "StructuredConfig", "StructuredFamily",
           "activation_report", "allocation_names", "compress", "prepare", "select_linears", "to_family"]
