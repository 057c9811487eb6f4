""":class:`~prunekit.config.PruneConfig` (one flat config for every family) → the typed family config.

The pattern and method name the family: a structured pattern (channels, heads, width, blocks, ffn)
is the structured family; a low-rank method (one that declares ``rank_budget_option``) is the
low-rank family, its ``sparsity`` the rank budget; anything else is the sparse family.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..masks import STRUCTURED_KINDS, Pattern
from ..registry import METHODS
from .base import FamilyConfig
from .lowrank import LowRankConfig
from .sparse import SparseConfig
from .structured import StructuredConfig


def to_family(cfg) -> FamilyConfig:
    """The family config a :class:`~prunekit.config.PruneConfig` says (validated: one-line ``ConfigError``)."""
    pattern = Pattern.parse(cfg.pattern)
    common = dict(include=cfg.include, exclude=cfg.exclude, calib=cfg.calib, allocation=cfg.allocation,
                  allocation_options=cfg.allocation_options, refine=cfg.refine, refine_options=cfg.refine_options)
    if pattern.kind in STRUCTURED_KINDS:
        return StructuredConfig(unit=pattern.kind, criterion=cfg.method, sparsity=cfg.sparsity,
                                criterion_options=cfg.method_options, **common)
    method = cfg.method or "wanda"
    option = METHODS.get(method).rank_budget_option if method in METHODS else None
    if option is None:
        return SparseConfig(method=method, sparsity=cfg.sparsity, pattern=str(pattern),
                            method_options=cfg.method_options, **common)
    if pattern.kind != "unstructured":
        raise ConfigError(f"method {method!r} cannot produce pattern {pattern} (it makes: unstructured); choose another "
                          "--pattern or --method")
    if cfg.sparsity is None:
        raise ConfigError(f"sparsity is required for method {method!r}: e.g. --sparsity 0.3")
    opts = {str(k).replace("-", "_"): v for k, v in dict(cfg.method_options).items()}
    kind = str(opts.pop(option, "rank"))
    if kind not in ("rank", "params"):
        raise ConfigError(f"method {method!r} option {option}={kind!r} is not one of: rank, params")
    budget = {"rank_removed": cfg.sparsity} if kind == "rank" else {"param_reduction": cfg.sparsity}
    return LowRankConfig(method=method, method_options=opts, **budget, **common)
