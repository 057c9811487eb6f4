"""Compression methods; each module registers itself in ``prunekit.registry.METHODS``."""

from . import dsnot, magnitude, sparsegpt, svd, svd_llm, wanda, welore  # noqa: F401  (self-registering)
from .base import CompressResult, InputStats, Method, Target, apply_keep_mask, weight_sparsity
from ..registry import METHODS


def build_method(name: str, **options) -> Method:
    """Instantiate a registered method, turning bad options into a clear ``ValueError``."""
    cls = METHODS.get(name)
    try:
        return cls(**options)
    except TypeError as e:
        allowed = ", ".join(f"{k}={v!r}" for k, v in cls.options().items()) or "none"
        raise ValueError(f"bad option for method {name!r}: {e}; its options are: {allowed}") from None


__all__ = ["CompressResult", "InputStats", "Method", "Target", "apply_keep_mask", "build_method", "weight_sparsity"]
