"""Layerwise sparsity allocation strategies (each module registers itself)."""

from . import alpha, owl, uniform  # noqa: F401  (self-registering)
from .base import Allocator, build_allocator, nm_allocation, project_to_mean, weighted_mean

__all__ = ["Allocator", "build_allocator", "nm_allocation", "project_to_mean", "weighted_mean"]
