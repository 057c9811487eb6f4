"""AlphaPruning: layerwise sparsity from heavy-tailed spectra (Lu et al., NeurIPS 2024,
arXiv:2410.10912, Sec. 3 and their ``ww_sparsity``).

1. Per linear, a spectral metric of its ESD (default ``alpha_peak``, the power-law exponent fit
   around the ESD peak; see :mod:`prunekit.allocation.esd`).
2. Block-wise mapping (default): average the metric over each block's linears.
3. Linear map onto ``[1 - eps, 1 + eps]``: ``r_l = (1 - eps) + 2 eps (q_l - q_min) / (q_max - q_min)``.
4. Scale so the parameter-weighted mean is the target: ``s_l = eta r_l``,
   ``eta = S sum(P_l) / sum(P_l r_l)``; then :func:`project_to_mean` keeps every layer in
   ``[0, 0.99]`` (a no-op unless eps and S are large).

Higher alpha (a lighter tail: less structure learned) → pruned more.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn

from ..masks import Pattern
from ..models import weight_view
from ..registry import ALLOCATORS
from .base import Allocator, block_lookup, minmax, project_to_mean
from .esd import METRICS, analyze_linears


def alpha_allocation(metric: Mapping[str, float], params: Mapping[str, int], sparsity: float, epsilon: float,
                     groups: Mapping[str, object] | None = None) -> dict[str, float]:
    """AlphaPruning's mapping from per-layer metric values to per-layer sparsities (pure).

    Args:
        metric: qualified name → metric value (e.g. alpha).
        params: qualified name → parameter count.
        sparsity: target parameter-weighted mean sparsity ``S``.
        epsilon: half-width of the ratio range ``[1 - eps, 1 + eps]``.
        groups: name → group (block); the metric is averaged within each group first
            (block-wise mapping). ``None``: layer-wise mapping.
    """
    names = list(metric)
    if groups is not None:
        sums: dict[object, list[float]] = {}
        for n in names:
            sums.setdefault(groups[n], []).append(float(metric[n]))
        q = {n: sum(sums[groups[n]]) / len(sums[groups[n]]) for n in names}
    else:
        q = {n: float(metric[n]) for n in names}
    norm = dict(zip(names, minmax([q[n] for n in names])))
    r = {n: (1.0 - epsilon) + 2.0 * epsilon * norm[n] for n in names}
    total = sum(params[n] for n in names)
    eta = sparsity * total / sum(params[n] * r[n] for n in names)
    return project_to_mean({n: eta * r[n] for n in names}, params, sparsity)


@ALLOCATORS.register("alpha", help="AlphaPruning: heavier-tailed ESD (lower alpha) → pruned less")
class AlphaAllocator(Allocator):
    """Options: ``metric`` (alpha_peak), ``epsilon`` (0.3), ``mapping`` (block | layer), ``peak_bounds``."""

    name = "alpha"

    def __init__(self, *, metric: str = "alpha_peak", epsilon: float = 0.3, mapping: str = "block",
                 peak_bounds: str = "reference", cache: bool = True) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"alpha allocation metric={metric!r} is not one of {', '.join(METRICS)}")
        if not (0.0 <= float(epsilon) < 1.0):
            raise ValueError(f"alpha allocation epsilon={epsilon!r} must lie in [0, 1), e.g. 0.3")
        if mapping not in ("block", "layer"):
            raise ValueError(f"alpha allocation mapping={mapping!r} must be 'block' or 'layer'")
        if peak_bounds not in ("reference", "intended"):
            raise ValueError(f"alpha allocation peak_bounds={peak_bounds!r} must be 'reference' or 'intended'")
        self.metric, self.epsilon, self.mapping, self.peak_bounds, self.cache = (
            metric, float(epsilon), mapping, peak_bounds, bool(cache))

    def allocate(self, model: nn.Module, linears: dict[str, nn.Module], sparsity: float, pattern: Pattern,
                 calib_ids: Tensor | None = None) -> dict[str, float]:
        block_of = block_lookup(model)
        spectra = analyze_linears(linears, block_of, use_cache=self.cache, peak_bounds=self.peak_bounds)
        values = {s.name: getattr(s, self.metric) for s in spectra}
        bad = [n for n, v in values.items() if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            raise ValueError(f"metric {self.metric} could not be fit for {bad[:3]} (too few eigenvalues); "
                             "exclude those layers or use --alloc-option metric=stable_rank")
        params = {n: weight_view(m).numel() for n, m in linears.items()}
        groups = {n: block_of(n) for n in linears} if self.mapping == "block" else None
        alloc = alpha_allocation(values, params, sparsity, self.epsilon, groups)
        self.info = {"metric": self.metric, "epsilon": self.epsilon, "mapping": self.mapping,
                     "metric_values": values}
        return alloc
