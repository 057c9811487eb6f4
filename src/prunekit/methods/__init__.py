"""Compression methods; each module registers itself in ``prunekit.registry.METHODS``."""

from . import dsnot, magnitude, sparsegpt, svd, svd_llm, wanda, welore  # noqa: F401  (self-registering)
from .base import CompressResult, InputStats, Method, Target, apply_keep_mask, instantiate, weight_sparsity
from ..registry import METHODS


def build_method(name: str, **options) -> Method:
    """Instantiate a registered method, turning bad options into a clear ``ValueError``."""
    return instantiate(METHODS, "method", name, options)


__all__ = ["CompressResult", "InputStats", "Method", "Target", "apply_keep_mask", "build_method", "weight_sparsity"]
