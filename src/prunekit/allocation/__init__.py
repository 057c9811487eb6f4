"""Layerwise sparsity allocation strategies (each module registers itself), and the per-linear
targets they lead to."""

from . import alpha, owl, uniform  # noqa: F401  (self-registering)
from .base import Allocator, build_allocator, nm_allocation, project_to_mean, weighted_mean
from .targets import allocation_summary, make_targets

__all__ = ["Allocator", "allocation_summary", "build_allocator", "make_targets", "nm_allocation", "project_to_mean",
           "weighted_mean"]
