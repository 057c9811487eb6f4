"""Compression methods; each module registers itself in ``prunekit.registry.METHODS``."""

from __future__ import annotations

from typing import Any, Mapping

from . import alps, dsnot, magnitude, reconstruct, ria, sparsegpt, svd, svd_llm, swaps, wanda, welore  # noqa: F401  (self-registering)
from ..registry import METHODS, REFINERS
from .base import CompressResult, InputStats, Method, Target, apply_keep_mask
from .refine import RefinedMethod, Refiner


def build_method(name: str, options: Mapping[str, Any] | None = None, refine: str | None = None,
                 refine_options: Mapping[str, Any] | None = None) -> Method:
    """A registered method with its typed options, wrapped with a registered refiner if ``refine``.

    Raises:
        ConfigError: an unknown name, or an option its declaration does not allow.
    """
    method = METHODS.build(name, options)
    if refine:
        method = RefinedMethod(method, REFINERS.build(refine, refine_options))
    return method


__all__ = ["CompressResult", "InputStats", "Method", "RefinedMethod", "Refiner", "Target", "apply_keep_mask",
           "build_method"]
