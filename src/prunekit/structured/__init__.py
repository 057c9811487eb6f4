"""Structured compression: remove whole heads, FFN channels, FFN sub-blocks or decoder blocks, so the
model gets physically smaller and faster. Every criterion file under ``criteria/`` registers itself
in :data:`prunekit.registry.STRUCTURED`; see docs/structured.md."""

from .criteria import flap, magnitude, ppl, shortgpt, slimgpt, wanda  # noqa: F401  (self-registering)
from .base import BlockCriterion, StructuredCriterion, UnitCriterion, UnitStats
from .defaults import DEFAULT_CRITERIA, default_criterion
from .prune import check_structured, prune_structured

__all__ = ["BlockCriterion", "DEFAULT_CRITERIA", "StructuredCriterion", "UnitCriterion", "UnitStats",
           "check_structured", "default_criterion", "prune_structured"]
