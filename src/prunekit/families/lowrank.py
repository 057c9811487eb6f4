"""The low-rank family: matrices replaced by rank-``k`` factorizations (``svd``, ``svd-llm``, ``welore``).

Its budget is a rank budget, named as one: ``rank_removed`` (the fraction of each matrix's rank, or
of the model's total rank for ``welore``) or ``param_reduction`` (the fraction of parameters saved).
It runs through the sparse family's engine: the methods read the budget as ``Target.sparsity`` and
the kind of budget from their own option (``budget`` for svd / svd-llm, ``objective`` for welore).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError
from ..registry import ALLOCATORS, METHODS, REFINERS
from .base import FamilyConfig, check_fraction, handles, typed_options
from .sparse import SparseFamily, check_engine_allocation, check_refine


def lowrank_methods() -> list[str]:
    return [n for n in METHODS.names() if METHODS.get(n).rank_budget_option]


@dataclass(frozen=True, kw_only=True)
class LowRankConfig(FamilyConfig):
    """Factorize the selected linears: give exactly one of ``rank_removed`` and ``param_reduction``.

    Attributes:
        method: a registered low-rank method: ``svd`` (data-free, the same fraction of every matrix),
            ``svd-llm`` (activation-aware whitening), ``welore`` (one global threshold on normalised
            singular values).
        rank_removed: fraction of rank removed, in [0, 1).
        param_reduction: fraction of parameters removed, in [0, 1) (SVD-LLM's compression ratio;
            for ``welore`` the parameter reduction its threshold meets).
        allocation: a registered per-layer allocation (``uniform``, ``owl``, ``alpha`` …) of the budget.
        method_options: the method's other options (its budget option is set from the field given).
    """

    method: str = "svd"
    rank_removed: float | None = None
    param_reduction: float | None = None
    allocation: str = "uniform"
    method_options: Mapping[str, Any] = field(default_factory=dict)
    allocation_options: Mapping[str, Any] = field(default_factory=dict)
    refine: str | None = None
    refine_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "refine", check_refine(self.refine, self.refine_options))
        if (self.rank_removed is None) == (self.param_reduction is None):
            raise ConfigError(f"rank_removed={self.rank_removed!r} and param_reduction={self.param_reduction!r}: give "
                              "exactly one rank budget, e.g. rank_removed=0.3 (of the rank) or param_reduction=0.3 "
                              "(of the parameters)")
        key = "rank_removed" if self.rank_removed is not None else "param_reduction"
        object.__setattr__(self, key, check_fraction(key, getattr(self, key), "0.3"))
        if self.method not in lowrank_methods():
            raise ConfigError(f"method {self.method!r} is not a low-rank method; choose one of: "
                              f"{', '.join(lowrank_methods())} (weight pruning: SparseConfig)")
        option = self.budget_option
        if option in {str(k).replace("-", "_") for k in self.method_options}:
            raise ConfigError(f"method option {option!r} is the rank budget's kind: drop it and give "
                              "rank_removed=... or param_reduction=... instead")
        check_engine_allocation(self.allocation)
        object.__setattr__(self, "method_options", typed_options(METHODS, self.method, self.method_options))
        object.__setattr__(self, "allocation_options", typed_options(ALLOCATORS, self.allocation,
                                                                     self.allocation_options))
        object.__setattr__(self, "refine_options", typed_options(REFINERS, self.refine, self.refine_options))

    @property
    def budget_option(self) -> str:
        """The method's option naming what its target removes (``budget`` or ``objective``)."""
        return METHODS.get(self.method).rank_budget_option

    @property
    def budget(self) -> float:
        """The fraction removed, whichever way it is counted."""
        return self.rank_removed if self.rank_removed is not None else self.param_reduction

    @property
    def budget_kind(self) -> str:
        """``"rank"`` or ``"params"``: the value of the method's budget option."""
        return "rank" if self.rank_removed is not None else "params"

    def front(self) -> dict[str, Any]:
        opts = dict(self.method_options)
        if self.budget_kind != "rank":  # "rank" is every method's default: PruneConfig leaves it unsaid
            opts[self.budget_option] = self.budget_kind
        return self._front(self.method, self.budget, "unstructured", self.allocation, opts, self.allocation_options,
                           self.refine, self.refine_options)


@handles(LowRankConfig)
class LowRankFamily(SparseFamily):
    """The sparse family's engine run with the rank budget as each target."""

    def method_options(self) -> Mapping[str, Any]:
        return {**self.config.method_options, self.config.budget_option: self.config.budget_kind}

    @property
    def target(self) -> float:
        return self.config.budget
