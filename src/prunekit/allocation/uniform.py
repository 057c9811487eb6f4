"""Uniform allocation: every selected linear gets the target sparsity."""

from __future__ import annotations

from torch import Tensor, nn

from ..masks import Pattern
from ..registry import ALLOCATORS
from .base import Allocator


@ALLOCATORS.register("uniform", help="every linear gets the target sparsity")
class Uniform(Allocator):
    name = "uniform"

    def allocate(self, model: nn.Module, linears: dict[str, nn.Module], sparsity: float, pattern: Pattern,
                 calib_ids: Tensor | None = None) -> dict[str, float]:
        return {name: sparsity for name in linears}
