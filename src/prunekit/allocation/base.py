"""Layerwise allocation: how much each linear is pruned so that the whole meets the target.

An allocator is a registered strategy returning ``{qualified_linear_name: sparsity}`` whose
parameter-weighted mean equals the target. It runs *before* the sequential loop; allocators that
need calibration statistics declare it, and get the calibration token ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from ..masks import Pattern
from ..registry import ALLOCATORS


class Allocator(ABC):
    """Base class of registered allocation strategies."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(f"allocation {self.name!r} takes no option(s) {sorted(options)}")

    @abstractmethod
    def allocate(
        self,
        model: nn.Module,
        linears: dict[str, nn.Module],
        sparsity: float,
        pattern: Pattern,
        calib_ids: Tensor | None = None,
    ) -> dict[str, float]:
        """Per-linear sparsity whose parameter-weighted mean is ``sparsity``."""


def build_allocator(name: str, **options: Any) -> Allocator:
    cls = ALLOCATORS.get(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad option for allocation {name!r}: {e}") from None


def weighted_mean(alloc: dict[str, float], params: dict[str, int]) -> float:
    total = sum(params[n] for n in alloc)
    return sum(alloc[n] * params[n] for n in alloc) / total if total else 0.0
