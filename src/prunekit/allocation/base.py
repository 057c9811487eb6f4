"""Layerwise allocation: how much each linear is pruned so that the whole meets the target.

An allocator is a registered strategy returning ``{qualified_linear_name: sparsity}`` whose
parameter-weighted mean equals the target. It runs *before* the sequential loop; allocators that
need calibration statistics declare it, and get the calibration token ids.

The pure helpers here are shared by every allocator:

* :func:`project_to_mean` — clip per-layer sparsities into ``[lo, hi]`` and redistribute what
  clipping removed so that the parameter-weighted mean is exactly the target;
* :func:`nm_allocation` — turn a per-layer allocation into one ``N`` (of ``M``) per group
  (block) whose parameter-weighted mean is as close to the target as the granularity allows.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

from torch import Tensor, nn

from ..errors import ConfigError
from ..masks import Pattern
from ..options import Options
from ..registry import ALLOCATORS

#: every allocator keeps each layer's sparsity in [MIN_SPARSITY, MAX_SPARSITY]
MIN_SPARSITY = 0.0
MAX_SPARSITY = 0.99


class Allocator(ABC):
    """Base class of registered allocation strategies.

    After :meth:`allocate`, ``self.info`` holds what the allocator measured (metrics, outlier
    ratios, per-block sparsities); ``prune`` copies it into ``report.extra["allocation"]``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    needs_calibration: ClassVar[bool] = False

    def __init__(self, options: Options | None = None) -> None:
        self.opts = options if options is not None else self.Options()
        self.info: dict[str, Any] = {}

    @abstractmethod
    def allocate(
        self,
        model: nn.Module,
        linears: dict[str, nn.Module],
        sparsity: float,
        pattern: Pattern,
        calib_ids: Tensor | None = None,
    ) -> dict[str, float]:
        """Per-linear sparsity whose parameter-weighted mean is ``sparsity``."""


def build_allocator(name: str, options: Mapping[str, Any] | None = None) -> Allocator:
    """A registered allocator with its typed options (``ConfigError`` on a bad name or option)."""
    return ALLOCATORS.build(name, options)


def weighted_mean(alloc: Mapping[str, float], params: Mapping[str, int]) -> float:
    total = sum(params[n] for n in alloc)
    return sum(alloc[n] * params[n] for n in alloc) / total if total else 0.0


def project_to_mean(
    values: Mapping[str, float],
    params: Mapping[str, int],
    target: float,
    lo: float = MIN_SPARSITY,
    hi: float = MAX_SPARSITY,
    tol: float = 1e-12,
) -> dict[str, float]:
    """Shift all values by one constant ``t`` and clip: ``s_l = clip(v_l + t, lo, hi)``.

    ``t`` is found by bisection so that ``sum(P_l s_l) / sum(P_l) = target``. This is the
    parameter-weighted Euclidean projection of ``values`` onto ``{lo <= s <= hi, mean = target}``:
    what clipping removes from one layer is spread evenly over the layers that are not clipped,
    and the differences between unclipped layers are kept. Values already inside the bounds
    with the right mean come back unchanged.

    Raises:
        ValueError: the target is outside ``[lo, hi]`` (no allocation can meet it).
    """
    if not values:
        return {}
    if not (lo - 1e-12 <= target <= hi + 1e-12):
        raise ConfigError(f"target sparsity {target} is outside the per-layer bounds [{lo}, {hi}]")
    names = list(values)
    v = [float(values[n]) for n in names]
    p = [float(params[n]) for n in names]
    total = sum(p)

    def mean_at(t: float) -> float:
        return sum(pi * min(hi, max(lo, vi + t)) for vi, pi in zip(v, p)) / total

    if all(lo <= vi <= hi for vi in v) and abs(mean_at(0.0) - target) <= tol:
        return dict(zip(names, v))
    a, b = lo - max(v), hi - min(v)  # mean_at(a) = lo <= target <= hi = mean_at(b)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
        if b - a < tol:
            break
    t = 0.5 * (a + b)
    return {n: min(hi, max(lo, vi + t)) for n, vi in zip(names, v)}


def nm_allocation(
    alloc: Mapping[str, float],
    params: Mapping[str, int],
    m: int,
    target: float,
    groups: Mapping[str, Any] | None = None,
) -> dict[str, int]:
    """One ``N`` (weights kept out of every ``m``) per group for a mixed N:M allocation.

    Each group (by default each layer; ``prune`` groups by decoder block, as OWL's mixed N:M
    does) gets the N nearest below its parameter-weighted mean density ``m * (1 - s_g)``; then,
    greedily by the largest rounding remainder, groups get ``N + 1`` while that brings the
    parameter-weighted mean sparsity closer to ``target``. ``N`` stays in ``[1, m - 1]``.

    Returns:
        ``{layer_name: N}``; the achieved mean is ``1 - sum(P_l N_l) / (m sum(P_l))``.
    """
    groups = dict(groups) if groups is not None else {n: n for n in alloc}
    members: dict[Any, list[str]] = {}
    for name in alloc:
        members.setdefault(groups[name], []).append(name)
    gp = {g: sum(params[n] for n in ns) for g, ns in members.items()}
    total = sum(gp.values())
    dens = {g: m * (1.0 - sum(alloc[n] * params[n] for n in ns) / gp[g]) for g, ns in members.items()}
    n_of = {g: min(m - 1, max(1, math.floor(d + 1e-9))) for g, d in dens.items()}

    def achieved() -> float:
        return 1.0 - sum(n_of[g] * gp[g] for g in gp) / (m * total)

    order = sorted(gp, key=lambda g: (-(dens[g] - n_of[g]), str(g)))
    for g in order:
        if n_of[g] >= m - 1:
            continue
        err = achieved() - target  # > 0: too sparse, keep more
        new_err = err - gp[g] / total / m
        if err > 0 and abs(new_err) < abs(err):
            n_of[g] += 1
    return {n: n_of[groups[n]] for n in alloc}


def minmax(values: list[float]) -> list[float]:
    """``(x - min) / (max - min)``; all zeros when the values are all equal."""
    lo, hi = min(values), max(values)
    if hi - lo <= 0:
        return [0.0 for _ in values]
    return [(x - lo) / (hi - lo) for x in values]
