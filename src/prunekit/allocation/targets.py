"""From an allocation (per-layer sparsities) to the per-linear targets the engine compresses to."""

from __future__ import annotations

from ..masks import Pattern
from ..methods.base import Target
from .base import nm_allocation, weighted_mean


def make_targets(alloc: dict[str, float], pattern: Pattern, params: dict[str, int] | None = None,
                 groups: dict[str, object] | None = None, target: float | None = None) -> dict[str, Target]:
    """Per-linear targets from an allocation.

    Unstructured: each layer's own sparsity. N:M with a non-uniform allocation (mixed N:M):
    one N per group (``groups``: name → block; default one per layer), rounded so that the
    parameter-weighted mean sparsity is as close to ``target`` (default: the allocation's own
    mean) as the 1/M granularity allows (:func:`prunekit.allocation.nm_allocation`).
    """
    if not pattern.is_nm or all(abs(s - pattern.sparsity) <= 1e-9 for s in alloc.values()):
        return {name: Target(pattern.sparsity if pattern.is_nm else s, pattern) for name, s in alloc.items()}
    params = params or {n: 1 for n in alloc}
    if target is None:
        target = weighted_mean(alloc, params)
    n_of = nm_allocation(alloc, params, pattern.m, target, groups)
    out = {}
    for name, n in n_of.items():
        p = Pattern("nm", n, pattern.m)
        out[name] = Target(p.sparsity, p)
    return out


def allocation_summary(alloc: dict[str, float], targets: dict[str, Target], params: dict[str, int], block_of,
                       target: float) -> dict:
    """What the allocation decided: target, requested and achieved means, per-block sparsity."""
    per_block: dict[int, list[float]] = {}
    for n, t in targets.items():
        acc = per_block.setdefault(block_of(n), [0.0, 0.0])
        acc[0] += t.sparsity * params[n]
        acc[1] += params[n]
    achieved = weighted_mean({n: t.sparsity for n, t in targets.items()}, params)
    return {
        "target": target,
        "allocated_mean": weighted_mean(alloc, params),
        "achieved_mean": achieved,
        "min": min((t.sparsity for t in targets.values()), default=0.0),
        "max": max((t.sparsity for t in targets.values()), default=0.0),
        "per_block": {b: v[0] / v[1] for b, v in sorted(per_block.items())},
        "patterns": sorted({str(t.pattern) for t in targets.values()}),
    }
