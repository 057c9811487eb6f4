"""The structured family: whole units removed (heads, FFN channels, both, blocks, FFN sub-blocks), the model shrinks.

:class:`StructuredConfig` says what; :class:`StructuredFamily` builds the criterion, the allocator
(none for ``global``: FLAP's one threshold over every block's standardised unit scores) and the
refiner once, and hands them to :func:`prunekit.structured.prune_structured`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor, nn

from ..allocation import build_allocator
from ..errors import ConfigError
from ..masks import STRUCTURED_KINDS, Pattern
from ..registry import ALLOCATORS, METHODS, REFINERS, STRUCTURED
from ..report import Report, RunInfo
from ..structured import check_structured, default_criterion, prune_structured
from .base import Family, FamilyConfig, check_fraction, handles, no_options, typed_options
from .sparse import check_refine

log = logging.getLogger(__name__)

#: allocations only this family has (name -> what ``prunekit ls`` says of it)
STRUCTURED_ALLOCATIONS = {"global": "structured only: every layer's standardised unit scores, one global threshold "
                                    "(FLAP's adaptive structure)"}


def allocation_names() -> list[str]:
    """Every allocation a config may name: the registered per-layer ones and the structured family's own."""
    return sorted({*ALLOCATORS.names(), *STRUCTURED_ALLOCATIONS})


def _serving(unit: str) -> str:
    return ", ".join(n for n in STRUCTURED.names() if unit in STRUCTURED.get(n).patterns)


@dataclass(frozen=True, kw_only=True)
class StructuredConfig(FamilyConfig):
    """Remove ``sparsity`` of the selected decoder-linear weights as whole units of kind ``unit``.

    Attributes:
        unit: ``channels`` (FFN channels), ``heads`` (attention heads), ``width`` (both), ``blocks``
            (decoder blocks) or ``ffn`` (FFN sub-blocks).
        criterion: a registered structured criterion (``slimgpt``, ``flap``, ``shortgpt`` …);
            ``None``: the unit's default (:data:`prunekit.structured.DEFAULT_CRITERIA`).
        sparsity: fraction of the selected decoder-linear weights removed, in [0, 1).
        allocation: ``uniform``, ``global`` (one threshold over all blocks' standardised scores) or a
            registered per-layer allocation (``owl``, ``alpha`` …) giving per-block rates.
        refine: a refiner that works on structured blocks (``reconstruct``), or ``None``.
        criterion_options / allocation_options / refine_options: keyword options of each component.
    """

    unit: str = "channels"
    criterion: str | None = None
    sparsity: float | None = None
    allocation: str = "uniform"
    criterion_options: Mapping[str, Any] = field(default_factory=dict)
    allocation_options: Mapping[str, Any] = field(default_factory=dict)
    refine: str | None = None
    refine_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "refine", check_refine(self.refine, self.refine_options))
        if self.unit not in STRUCTURED_KINDS:
            raise ConfigError(f"unit={self.unit!r} is not one of {', '.join(STRUCTURED_KINDS)} (unstructured or N:M: "
                              "SparseConfig)")
        if self.criterion is None:
            object.__setattr__(self, "criterion", default_criterion(self.unit))
        self._check_refine()
        super().__post_init__()
        if self.sparsity is None:
            raise ConfigError(f"sparsity is required for pattern {self.unit}: e.g. --sparsity 0.5")
        object.__setattr__(self, "sparsity", check_fraction("sparsity", self.sparsity, "0.5 for 50%"))
        self._check_criterion()
        opts = typed_options(STRUCTURED, self.criterion, self.criterion_options)
        object.__setattr__(self, "criterion_options", opts)
        alloc = (no_options(self.allocation_options, f"allocation {self.allocation!r}")
                 if self.allocation in STRUCTURED_ALLOCATIONS else
                 typed_options(ALLOCATORS, self.allocation, self.allocation_options))
        object.__setattr__(self, "allocation_options", alloc)
        object.__setattr__(self, "refine_options", typed_options(REFINERS, self.refine, self.refine_options))

    def _check_refine(self) -> None:
        if self.refine is None:
            return
        if not getattr(REFINERS.get(self.refine), "structured", False):
            raise ConfigError(f"refine={self.refine!r} works on unstructured masks, not on pattern {self.unit}; drop "
                              "--refine (after structured pruning: --refine reconstruct)")
        why = REFINERS.get(self.refine).structured_refusal(self.refine_options)
        if why:
            raise ConfigError(f"pattern {self.unit}: {why}")
        if self.unit in ("blocks", "ffn"):
            raise ConfigError(f"refine={self.refine!r} refits the linears left in a block; pattern {self.unit} removes "
                              "whole blocks or FFNs: use channels, heads or width, or drop --refine")

    def _check_criterion(self) -> None:
        if self.criterion not in STRUCTURED and self.criterion in METHODS:
            raise ConfigError(f"method {self.criterion!r} prunes single weights (unstructured or N:M); --pattern "
                              f"{self.unit} removes whole units: use one of {_serving(self.unit)} as --method, or "
                              "drop --pattern")
        cls = STRUCTURED.get(self.criterion)
        if self.unit not in cls.patterns:
            raise ConfigError(f"criterion {self.criterion!r} cannot serve pattern {self.unit} (it serves: "
                              f"{', '.join(cls.patterns)}); for {self.unit} use one of: {_serving(self.unit)}")
        if self.allocation not in STRUCTURED_ALLOCATIONS and self.allocation not in ALLOCATORS:
            raise ConfigError(f"unknown allocation {self.allocation!r}; choose one of: {', '.join(allocation_names())}")

    def front(self) -> dict[str, Any]:
        return self._front(self.criterion, self.sparsity, self.unit, self.allocation, self.criterion_options,
                           self.allocation_options, self.refine, self.refine_options)


@handles(StructuredConfig)
class StructuredFamily(Family):
    """Plan, remove through the sequential engine, shrink: :mod:`prunekit.structured`."""

    streams = False  # the model is reshaped as a whole
    save_formats = ("dense",)
    removes_units = True

    def build(self) -> None:
        c = self.config
        self.criterion = STRUCTURED.build(c.criterion, c.criterion_options)
        #: ``None`` for ``global``: prunekit.structured plans every block together
        self.allocator = (None if c.allocation in STRUCTURED_ALLOCATIONS else
                          build_allocator(c.allocation, c.allocation_options))
        self.refiner = REFINERS.build(c.refine, c.refine_options) if c.refine else None

    @property
    def needs_calibration(self) -> bool:
        return self.criterion.needs_calibration or bool(self.allocator and self.allocator.needs_calibration)

    def save_format_refusal(self, save_format: str) -> str:
        return (f"--save-format {save_format} stores the zeros of a sparse model compactly; --pattern {self.config.unit} "
                f"removes them outright (the saved model is already smaller): drop --save-format {save_format}")

    def check(self, model: nn.Module) -> dict[str, nn.Module]:
        linears = self.select(model)
        c = self.config
        check_structured(model, Pattern.parse(c.unit), self.criterion, linears, c.sparsity,
                         uniform=c.allocation == "uniform")
        return linears

    def run(self, model: nn.Module, linears: dict[str, nn.Module], calib: Tensor | None, calib_info: dict,
            device, callback, started: float) -> Report:
        c = self.config
        f = c.front()
        info = RunInfo(c.criterion, c.sparsity, c.unit, c.allocation, calib_info, f, {}, started=started)
        report = prune_structured(model, Pattern.parse(c.unit), c.sparsity, self.criterion, self.allocator, linears,
                                  calib, info, c.calib.batch_size, device, callback, self.refiner)
        log.info("removed %d parameters in %.1fs", report.extra["structure"]["params_removed"], report.seconds)
        return report
