"""Essential sparsity: where a quality-vs-sparsity curve breaks (pure functions).

Jaiswal et al. ("The Emergence of Essential Sparsity in Large Pre-trained Models", 2023)
observe a sharp turning point in one-shot pruning curves: up to some sparsity quality barely
moves, after it quality falls much faster. prunekit locates it in two ways, both reported:

1. **Tolerance knee** (``tolerance_knee``): the largest swept sparsity ``s*`` such that every
   point at ``s <= s*`` loses at most ``tol`` quality relative to dense. Quality loss is
   ``L(s) = q(0) - q(s)`` (absolute, for accuracy-like metrics where higher is better) or
   ``L(s) = q(s) / q(0) - 1`` (relative, for perplexity-like metrics where lower is better).
2. **Two-segment knee** (``piecewise_knee``): the breakpoint ``k`` of the continuous
   piecewise-linear least-squares fit ``y = a + b·s + c·max(0, s - k)``, with ``k`` restricted
   to interior swept sparsities (each segment has >= 2 points). Perplexity is fitted as
   ``y = ln(ppl)``. A knee is reported only when the second segment degrades faster than the
   first (slope after is worse than slope before); otherwise the curve has no knee (``None``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class Knee:
    sparsity: float  # the breakpoint k
    slope_before: float  # dy/ds of the first segment (y = metric, or ln ppl)
    slope_after: float
    sse: float

    def to_dict(self) -> dict:
        return asdict(self)


def _check(s: Sequence[float], q: Sequence[float]) -> None:
    if len(s) != len(q):
        raise ValueError(f"{len(s)} sparsities for {len(q)} values")
    if any(b <= a for a, b in zip(s, s[1:])):
        raise ValueError(f"sparsities must be strictly increasing, got {list(s)}")


def quality_loss(q0: float, q: float, higher_is_better: bool) -> float:
    """``q0 - q`` when higher is better, ``q / q0 - 1`` when lower is better (perplexity)."""
    if higher_is_better:
        return q0 - q
    return q / q0 - 1.0 if q0 > 0 else math.inf


def tolerance_knee(s: Sequence[float], q: Sequence[float], higher_is_better: bool, tol: float) -> float | None:
    """Largest ``s[k]`` with ``quality_loss(q[0], q[j]) <= tol`` for all ``j <= k`` (``s[0]`` is dense).

    Returns ``None`` for an empty curve; ``s[0]`` when the first pruned point already fails.
    """
    _check(s, q)
    if not s:
        return None
    best = s[0]
    for sj, qj in zip(s[1:], q[1:]):
        if not math.isfinite(qj) or quality_loss(q[0], qj, higher_is_better) > tol + 1e-12:  # float slack
            break
        best = sj
    return best


def _lstsq3(s: Sequence[float], y: Sequence[float], k: float) -> tuple[float, float, float, float]:
    """Least squares of ``y ≈ a + b s + c max(0, s-k)``: returns ``(a, b, c, sse)``."""
    import numpy as np

    x = np.asarray(s, dtype=float)
    A = np.stack([np.ones_like(x), x, np.maximum(0.0, x - k)], axis=1)
    coef, *_ = np.linalg.lstsq(A, np.asarray(y, dtype=float), rcond=None)
    resid = A @ coef - np.asarray(y, dtype=float)
    return float(coef[0]), float(coef[1]), float(coef[2]), float(resid @ resid)


def piecewise_knee(s: Sequence[float], q: Sequence[float], higher_is_better: bool,
                   log_values: bool | None = None) -> Knee | None:
    """Breakpoint of the best continuous two-segment linear fit, if the curve breaks downward.

    Args:
        s, q: sparsities (increasing) and metric values; needs >= 4 finite points.
        higher_is_better: direction of the metric (accuracy True, perplexity False).
        log_values: fit ``ln q`` (default: when lower is better, i.e. perplexity).
    """
    _check(s, q)
    log_values = (not higher_is_better) if log_values is None else log_values
    pts = [(a, math.log(b) if log_values else b) for a, b in zip(s, q) if math.isfinite(b) and (b > 0 or not log_values)]
    if len(pts) < 4:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    best: Knee | None = None
    for k in xs[1:-1]:
        _, b, c, sse = _lstsq3(xs, ys, k)
        if best is None or sse < best.sse - 1e-12:
            best = Knee(k, b, b + c, sse)
    if best is None:
        return None
    # "falls much faster after": the degradation rate after the knee exceeds the one before
    worse_after = best.slope_after < best.slope_before if higher_is_better else best.slope_after > best.slope_before
    degrading = best.slope_after < 0 if higher_is_better else best.slope_after > 0
    return best if worse_after and degrading else None
