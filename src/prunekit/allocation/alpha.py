"""AlphaPruning: layerwise sparsity from heavy-tailed spectra (Lu et al., NeurIPS 2024,
arXiv:2410.10912, Sec. 3 and their ``ww_sparsity``).

1. Per linear, a spectral metric of its ESD (default ``alpha_peak``, the power-law exponent fit
   around the ESD peak; see :mod:`prunekit.analysis.esd`).
2. Block-wise mapping (default): average the metric over each block's linears.
3. Linear map onto ``[1 - eps, 1 + eps]``: ``r_l = (1 - eps) + 2 eps (q_l - q_min) / (q_max - q_min)``.
4. Scale so the parameter-weighted mean is the target: ``s_l = eta r_l``,
   ``eta = S sum(P_l) / sum(P_l r_l)``; then :func:`project_to_mean` keeps every layer in
   ``[0, 0.99]`` (a no-op unless eps and S are large).

Higher alpha (a lighter tail: less structure learned) → pruned more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor, nn

from ..masks import Pattern
from ..errors import ConfigError
from ..models import block_lookup, weight_view
from ..options import Options, option
from ..registry import ALLOCATORS
from .base import Allocator, minmax, project_to_mean
from ..analysis.esd import METRICS, analyze_linears


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


@dataclass(frozen=True)
class AlphaOptions(Options):
    metric: str = option("alpha_peak", "spectral metric of each weight's ESD", choices=tuple(METRICS))
    epsilon: float = option(0.3, "half-width of the ratio range [1 - eps, 1 + eps]", lo=0.0, hi=1.0, hi_open=True)
    mapping: str = option("block", "average the metric per block (paper) or use each layer's own",
                          choices=("block", "layer"))
    peak_bounds: str = option("reference", "x_min candidates around the ESD peak: as the reference code or as "
                              "its comment intends", choices=("reference", "intended"))
    cache: bool = option(True, "reuse spectra cached on disk for unchanged weights")


@ALLOCATORS.register("alpha", help="AlphaPruning: heavier-tailed ESD (lower alpha) → pruned less")
class AlphaAllocator(Allocator):
    """AlphaPruning allocation (options: :class:`AlphaOptions`)."""

    name = "alpha"
    Options = AlphaOptions

    def allocate(self, model: nn.Module, linears: dict[str, nn.Module], sparsity: float, pattern: Pattern,
                 calib_ids: Tensor | None = None) -> dict[str, float]:
        block_of = block_lookup(model)
        spectra = analyze_linears(linears, block_of, use_cache=self.opts.cache, peak_bounds=self.opts.peak_bounds)
        values = {s.name: getattr(s, self.opts.metric) for s in spectra}
        bad = [n for n, v in values.items() if v != v or v in (float("inf"), float("-inf"))]
        if bad:
            raise ConfigError(f"metric {self.opts.metric} could not be fit for {bad[:3]} (too few eigenvalues); "
                             "exclude those layers or use --alloc-option metric=stable_rank")
        params = {n: weight_view(m).numel() for n, m in linears.items()}
        groups = {n: block_of(n) for n in linears} if self.opts.mapping == "block" else None
        alloc = alpha_allocation(values, params, sparsity, self.opts.epsilon, groups)
        self.info = {"metric": self.opts.metric, "epsilon": self.opts.epsilon, "mapping": self.opts.mapping,
                     "metric_values": values}
        return alloc
