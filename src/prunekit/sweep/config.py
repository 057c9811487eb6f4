"""What a sparsity sweep runs: the grid of cells and how every cell is scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import CalibConfig
from ..errors import ConfigError
from ..registry import ALLOCATORS, METHODS


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep and how to score it.

    Attributes:
        methods / allocations / calibs: registered names (``calibs`` are calibration datasets).
        sparsities: target sparsities in [0, 1); 0 is the dense baseline (never pruned).
        pattern: ``unstructured`` (N:M patterns fix the sparsity, so they are not swept).
        calib: nsamples / seqlen / seed / batch size of the calibration (its dataset is replaced
            by each entry of ``calibs``).
        method_options / allocation_options: per name, options checked against each component's
            declared ``Options`` (values converted to their types).
        tasks: task specs (``ppl:wikitext2``, ``piqa`` …) scored on every cell.
        tolerance: tolerance knee for higher-is-better metrics (absolute loss, 0.02 = 2 points).
        ppl_tolerance: tolerance knee for perplexity (relative increase, 0.05 = +5%).
    """

    methods: tuple[str, ...] = ("wanda", "magnitude")
    allocations: tuple[str, ...] = ("uniform",)
    sparsities: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    calibs: tuple[str, ...] = ("austen",)
    pattern: str = "unstructured"
    calib: CalibConfig = field(default_factory=lambda: CalibConfig(nsamples=32, seqlen=512))
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    allocation_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tasks: tuple[str, ...] = ("ppl:wikitext2",)
    tolerance: float = 0.02
    ppl_tolerance: float = 0.05

    def __post_init__(self) -> None:
        for attr in ("methods", "allocations", "sparsities", "calibs", "tasks"):
            value = tuple(getattr(self, attr))
            if not value:
                raise ConfigError(f"sweep {attr} is empty: give at least one")
            if len(set(value)) != len(value):
                raise ConfigError(f"sweep {attr} has duplicates: {list(value)}")
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "method_options", _typed(METHODS, self.methods, self.method_options))
        object.__setattr__(self, "allocation_options", _typed(ALLOCATORS, self.allocations, self.allocation_options))
        s = tuple(sorted(float(x) for x in self.sparsities))
        if any(not 0.0 <= x < 1.0 for x in s):
            raise ConfigError(f"sweep sparsities {list(s)} must lie in [0, 1), e.g. 0 0.1 ... 0.8")
        object.__setattr__(self, "sparsities", s)
        if ":" in self.pattern:
            raise ConfigError(f"pattern {self.pattern!r}: an N:M pattern fixes the sparsity; sweep unstructured sparsity")
        for name, tol in (("tolerance", self.tolerance), ("ppl_tolerance", self.ppl_tolerance)):
            if not (isinstance(tol, (int, float)) and 0 < tol < 1):
                raise ConfigError(f"{name}={tol!r} must be a fraction in (0, 1)")

    def cells(self) -> list[dict[str, Any]]:
        """The pruned cells in run order (sparsity 0 is the shared dense baseline, not a cell).

        Sparsity is the outer loop, so an interrupted sweep has every curve up to the same sparsity.
        """
        return [dict(method=m, allocation=a, calib=c, sparsity=s)
                for s in self.sparsities if s > 0 for c in self.calibs for a in self.allocations for m in self.methods]


def _typed(registry, names: tuple[str, ...], options: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Options per component name, each checked by the component's declaration (unknown names refused)."""
    out = {}
    for name, raw in dict(options).items():
        if name not in names:
            raise ConfigError(f"options given for {registry.kind} {name!r}, which the sweep does not run "
                              f"(it runs {list(names)})")
        opts = registry.get(name).Options.parse(raw, f"{registry.kind} {name!r}")
        out[name] = {k.replace("-", "_"): getattr(opts, k.replace("-", "_")) for k in dict(raw)}
    for name in names:
        registry.get(name)  # unknown names fail now, with the choices
    return out


def cell_key(cell: Mapping[str, Any]) -> str:
    return f"{cell['method']}|{cell['allocation']}|{cell['calib']}|{float(cell['sparsity']):.4f}"
