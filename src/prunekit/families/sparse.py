"""The sparse family: single weights zeroed (unstructured or N:M) by a method, layer by layer.

:class:`SparseConfig` says what; :class:`SparseFamily` builds the method (wrapped with its refiner)
and the allocator once, turns the allocation into per-linear targets and runs the sequential engine.
The low-rank family (:mod:`.lowrank`) runs through the same engine with a rank budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor, nn

from ..allocation import allocation_summary, build_allocator, make_targets
from ..allocation.base import Allocator
from ..calibration import run_sequential
from ..errors import ConfigError
from ..masks import Pattern
from ..methods import Method, Target, build_method
from ..models import block_lookup, weight_view
from ..registry import ALLOCATORS, METHODS, REFINERS, STRUCTURED
from ..report import Report, RunInfo
from .base import Family, FamilyConfig, check_fraction, handles, typed_options

log = logging.getLogger(__name__)


def check_refine(refine: str | None, refine_options: Mapping[str, Any]) -> str | None:
    """``refine`` normalised (``""``/``"none"`` → ``None``); options without a refiner refused."""
    if refine in ("", "none"):
        refine = None
    if refine_options and refine is None:
        raise ConfigError(f"refine_options={dict(refine_options)} given without a refiner: add --refine dsnot")
    return refine


def check_engine_allocation(allocation: str) -> None:
    """The per-layer allocators of the engine; ``global`` belongs to the structured family."""
    if allocation == "global":
        raise ConfigError("allocation 'global' ranks whole heads/channels: use it with a structured --pattern "
                          "(channels, heads, width)")
    ALLOCATORS.get(allocation)


@dataclass(frozen=True, kw_only=True)
class SparseConfig(FamilyConfig):
    """Zero single weights: ``method`` (``wanda``, ``sparsegpt`` …) removes ``sparsity`` of the selected weights.

    Attributes:
        method: a registered weight-pruning method (``prunekit ls``).
        sparsity: fraction of the selected weights zeroed, in [0, 1); ``None`` with an N:M pattern:
            the pattern's own (2:4 → 0.5).
        pattern: ``unstructured`` or ``N:M`` (N kept in every M consecutive inputs).
        allocation: a registered per-layer allocation (``uniform``, ``owl``, ``alpha`` …).
        refine: a registered refiner run on every layer right after the method (``dsnot`` …), or ``None``.
        method_options / allocation_options / refine_options: keyword options of each component.
    """

    method: str = "wanda"
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    allocation_options: Mapping[str, Any] = field(default_factory=dict)
    refine: str | None = None
    refine_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "refine", check_refine(self.refine, self.refine_options))
        pat = Pattern.parse(self.pattern)
        if pat.kind not in ("unstructured", "nm"):
            raise ConfigError(f"pattern {pat} removes whole units: use StructuredConfig(unit={pat.kind!r}) "
                              "(or PruneConfig(pattern=...)); SparseConfig takes unstructured or N:M")
        object.__setattr__(self, "pattern", str(pat))
        object.__setattr__(self, "sparsity", sparse_target(self.sparsity, pat, self.allocation))
        self._check_method(pat)
        check_engine_allocation(self.allocation)
        for reg, name, key in ((METHODS, self.method, "method_options"), (ALLOCATORS, self.allocation,
                               "allocation_options"), (REFINERS, self.refine, "refine_options")):
            object.__setattr__(self, key, typed_options(reg, name, getattr(self, key)))

    def _check_method(self, pattern: Pattern) -> None:
        if self.method in STRUCTURED and self.method not in METHODS:
            kinds = STRUCTURED.get(self.method).patterns
            units = "whole blocks or FFNs" if set(kinds) <= {"blocks", "ffn"} else "whole heads/channels"
            raise ConfigError(f"{self.method!r} removes {units}: use it with --pattern {' / '.join(kinds)}; for "
                              f"--pattern {pattern} choose a --method from: {', '.join(METHODS.names())}")
        cls = METHODS.get(self.method)
        if pattern.kind not in cls.patterns:
            raise ConfigError(f"method {self.method!r} cannot produce pattern {pattern} (it makes: "
                              f"{', '.join(cls.patterns)}); choose another --pattern or --method")

    def front(self) -> dict[str, Any]:
        return self._front(self.method, self.sparsity, self.pattern, self.allocation, self.method_options,
                           self.allocation_options, self.refine, self.refine_options)


def sparse_target(sparsity: float | None, pattern: Pattern, allocation: str) -> float:
    """The checked target fraction: ``None`` means the N:M pattern's own; uniform N:M must match it."""
    if sparsity is None:
        if not pattern.is_nm:
            raise ConfigError(f"sparsity is required for pattern {pattern}: e.g. --sparsity 0.5")
        sparsity = pattern.sparsity
    s = check_fraction("sparsity", sparsity, "0.5 for 50%")
    if pattern.is_nm and allocation == "uniform" and abs(s - pattern.sparsity) > 1e-9:
        raise ConfigError(f"sparsity={s} contradicts pattern {pattern} (which is {pattern.sparsity:.0%} sparse); "
                          "drop --sparsity or use a non-uniform --allocation for mixed N:M")
    return s


@handles(SparseConfig)
class SparseFamily(Family):
    """Per-layer targets from the allocator, then the sequential engine with the method."""

    method: Method
    allocator: Allocator

    def build(self) -> None:
        c = self.config
        self.allocator = build_allocator(c.allocation, c.allocation_options)
        self.method = build_method(c.method, self.method_options(), c.refine, c.refine_options)

    def method_options(self) -> Mapping[str, Any]:
        return self.config.method_options

    @property
    def target(self) -> float:
        """The mean fraction the allocator spreads over the layers."""
        return self.config.sparsity

    @property
    def needs_calibration(self) -> bool:
        return self.method.needs_calibration or self.allocator.needs_calibration

    def targets(self, model: nn.Module, linears: dict[str, nn.Module], calib: Tensor | None,
                weights=None) -> tuple[dict[str, Target], dict]:
        """Per-linear targets from the allocator, and the allocation's summary for the report.

        ``weights``: the linears as the allocator reads them (default ``linears``; a streamed model
        passes a mapping that reads each weight from the checkpoint when asked for).
        """
        c, target = self.config, self.target
        pattern = c.pattern_obj
        alloc = self.allocator.allocate(model, linears if weights is None else weights, target, pattern,
                                        calib if self.allocator.needs_calibration else None)
        params = {n: weight_view(m).numel() for n, m in linears.items()}
        block_of = block_lookup(model)
        targets = make_targets(alloc, pattern, params, {n: block_of(n) for n in alloc}, target)
        summary = allocation_summary(alloc, targets, params, block_of, target)
        summary.update(name=c.allocation, options=dict(c.allocation_options), info=self.allocator.info)
        log.info("%s, %s, %s allocation: %d linears, allocated sparsity %.4f (target %.4f)", c.method, pattern,
                 c.allocation, len(targets), summary["achieved_mean"], target)
        return targets, summary

    def run_info(self, calib_info: dict, extra: dict, started: float) -> RunInfo:
        f = self.config.front()
        return RunInfo(f["method"], f["sparsity"], f["pattern"], f["allocation"], calib_info, f, extra, started=started)

    def run(self, model: nn.Module, linears: dict[str, nn.Module], calib: Tensor | None, calib_info: dict,
            device, callback, started: float) -> Report:
        targets, alloc_summary = self.targets(model, linears, calib)
        info = self.run_info(calib_info, {"allocation": alloc_summary}, started)
        report = run_sequential(model, calib if self.method.needs_calibration else None, self.method, targets,
                                self.config.calib.batch_size, device, callback, info=info)
        log.info("pruned to %.4f sparsity (target %.4f) in %.1fs", report.sparsity, self.target, report.seconds)
        return report
