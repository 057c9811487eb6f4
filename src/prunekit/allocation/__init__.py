"""Layerwise sparsity allocation strategies (each module registers itself)."""

from . import uniform  # noqa: F401  (self-registering)
from .base import Allocator, build_allocator, weighted_mean

__all__ = ["Allocator", "build_allocator", "weighted_mean"]
