"""Compression families as types: a typed config per family, one handler per config type.

``prunekit.compress(model, config)`` dispatches by the config's type (the torchao
``quantize_(model, config)`` shape): :class:`SparseConfig` (single weights zeroed, unstructured or
N:M), :class:`StructuredConfig` (whole units removed, the model shrinks), :class:`LowRankConfig`
(matrices factorized, a rank budget). :class:`~prunekit.config.PruneConfig` is the flat, compatible
front: ``PruneConfig.family()`` is its typed config.
"""

from .base import HANDLERS, Family, FamilyConfig, compress, prepare, select_linears
from .lowrank import LowRankConfig, LowRankFamily
from .sparse import SparseConfig, SparseFamily
from .structured import STRUCTURED_ALLOCATIONS, StructuredConfig, StructuredFamily, allocation_names
from .front import to_family

__all__ = ["HANDLERS", "STRUCTURED_ALLOCATIONS", "Family", "FamilyConfig", "LowRankConfig", "LowRankFamily",
           "SparseConfig", "SparseFamily", "StructuredConfig", "StructuredFamily", "allocation_names", "compress",
           "prepare", "select_linears", "to_family"]
