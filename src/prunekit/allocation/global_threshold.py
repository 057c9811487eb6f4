"""``global``: FLAP's adaptive structure for structured patterns (one threshold on standardised scores).

It does not produce per-linear rates: the structured pipeline recognises it
(:func:`prunekit.structured.global_plan.global_plan`) and ranks every head level and channel run
of every block together. With an unstructured pattern it fails before any work.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError
from ..masks import Pattern
from ..registry import ALLOCATORS
from .base import Allocator


@ALLOCATORS.register("global", help="structured only: every layer's standardised unit scores, one global threshold "
                                    "(FLAP's adaptive structure)")
class GlobalThreshold(Allocator):
    name = "global"
    #: recognised by prunekit.structured; refused for unstructured and N:M patterns
    structured_only = True

    def allocate(self, model: nn.Module, linears: dict[str, nn.Module], sparsity: float, pattern: Pattern,
                 calib_ids: Tensor | None = None) -> dict[str, float]:
        raise ConfigError("allocation 'global' ranks whole heads/channels: use it with a structured --pattern "
                          "(channels, heads, width)")
