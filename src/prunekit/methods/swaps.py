"""SparseSwaps: refine any pruning mask by exact 1-swaps on the Gram matrix (Zimmer, Roux, Wagner,
Hendrych, Pokutta 2025, "SparseSwaps: tractable LLM pruning mask refinement at scale", arXiv:2512.10922).

The layer-wise mask problem ``min_M ||W X - (M ⊙ W) X||^2`` decouples into rows once every row
keeps its own number of weights. For one row with dense weights ``w``, current weights ``ŵ`` (zero
where pruned), residual ``r = w - ŵ``, Gram matrix ``G = X^T X`` and ``c = G r``, the error is
``E = r^T G r``; pruning the kept ``i`` (``r_i += ŵ_i``) and restoring the pruned ``j`` to its dense
value (``r_j -= w_j``) changes it by, exactly,

    ΔE(i, j) = 2 ŵ_i c_i + ŵ_i² G_ii  −  2 w_j c_j + w_j² G_jj  −  2 ŵ_i w_j G_ij.

Each iteration takes, in every row at once, the pair with the most negative ``ΔE`` (the optimal
1-swap) and applies it if it lowers the error, updating ``c`` in O(n). Every swap keeps the row's
count of weights; for N:M only pairs inside one group of M are candidates, so every group keeps
exactly N. A row stops when no swap improves it; every row stops after ``max_iters`` swaps.
Warm-started from any mask (Wanda's, SparseGPT's …): the current kept values are used as they are
(SparseGPT's updated weights), a restored weight takes its dense value.

Exact search costs ``rows × n²`` per iteration (the paper runs it on GPUs); ``candidates=K``
restricts it to the K kept weights cheapest to remove and the K pruned weights most useful to
restore (by their own terms of ``ΔE``), an approximation of ours for CPUs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..masks import Pattern
from ..models import weight_view
from ..options import Options, option
from ..registry import REFINERS
from .base import InputStats, Target
from .refine import Refiner, skip_matcher

log = logging.getLogger(__name__)

_INF = float("inf")


def swap_terms(dense: Tensor, current: Tensor, keep: Tensor, c: Tensor, gdiag: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, b)``: the pair-independent parts of ``ΔE``, ``a_i = 2 ŵ_i c_i + ŵ_i² G_ii`` for kept ``i`` and
    ``b_j = −2 w_j c_j + w_j² G_jj`` for pruned ``j`` (``+inf`` elsewhere, and where ``w_j = 0``: restoring
    a zero would only drop a weight)."""
    a = torch.where(keep, 2 * current * c + current * current * gdiag, _INF)
    b = torch.where(~keep & (dense != 0), -2 * dense * c + dense * dense * gdiag, _INF)
    return a, b


def swap_gain(dense: Tensor, current: Tensor, g: Tensor, i: int, j: int) -> float:
    """``ΔE`` of one swap in a single row (prune kept ``i``, restore pruned ``j``), from the formula (float64)."""
    w, v, gg = dense.double(), current.double(), g.double()
    c = gg @ (w - v)
    return float(2 * v[i] * c[i] + v[i] ** 2 * gg[i, i] - 2 * w[j] * c[j] + w[j] ** 2 * gg[j, j]
                 - 2 * v[i] * w[j] * gg[i, j])


def _best_unstructured(dense, current, keep, c, g, gdiag, candidates: int, chunk: int):
    """Per row: the best ``(ΔE, i, j)`` over kept ``i`` × pruned ``j`` (or over the candidate sets)."""
    rows, n = dense.shape
    a, b = swap_terms(dense, current, keep, c, gdiag)
    best = torch.empty(rows, dtype=dense.dtype, device=dense.device)
    bi = torch.empty(rows, dtype=torch.long, device=dense.device)
    bj = torch.empty_like(bi)
    if candidates:
        k = min(candidates, n)
        ii = torch.topk(a, k, dim=1, largest=False).indices
        jj = torch.topk(b, k, dim=1, largest=False).indices
    for s in range(0, rows, chunk):
        e = min(s + chunk, rows)
        if candidates:
            gsub = g[ii[s:e].unsqueeze(2), jj[s:e].unsqueeze(1)]  # [r, k, k]
            vi, wj = current[s:e].gather(1, ii[s:e]), dense[s:e].gather(1, jj[s:e])
            d = gsub.mul_(vi.unsqueeze(2)).mul_(wj.unsqueeze(1)).mul_(-2)
            d.add_(a[s:e].gather(1, ii[s:e]).unsqueeze(2)).add_(b[s:e].gather(1, jj[s:e]).unsqueeze(1))
            val, flat = d.reshape(e - s, -1).min(1)
            bi[s:e] = ii[s:e].gather(1, (flat // k).unsqueeze(1)).squeeze(1)
            bj[s:e] = jj[s:e].gather(1, (flat % k).unsqueeze(1)).squeeze(1)
        else:
            d = g.unsqueeze(0).mul(current[s:e].unsqueeze(2)).mul_(dense[s:e].unsqueeze(1)).mul_(-2)
            d.add_(a[s:e].unsqueeze(2)).add_(b[s:e].unsqueeze(1))
            val, flat = d.reshape(e - s, -1).min(1)
            bi[s:e], bj[s:e] = flat // n, flat % n
        best[s:e] = val
    return best, bi, bj


def _best_nm(dense, current, keep, c, gblocks, gdiag, m: int):
    """Per row: the best ``(ΔE, i, j)`` over pairs inside one group of ``m`` consecutive inputs."""
    rows, n = dense.shape
    a, b = swap_terms(dense, current, keep, c, gdiag)
    groups = n // m
    v, w = current.reshape(rows, groups, m), dense.reshape(rows, groups, m)
    d = gblocks.unsqueeze(0) * v.unsqueeze(3) * w.unsqueeze(2) * -2  # [rows, groups, m(i), m(j)]
    d = d + a.reshape(rows, groups, m, 1) + b.reshape(rows, groups, 1, m)
    val, flat = d.reshape(rows, -1).min(1)
    grp, rem = flat // (m * m), flat % (m * m)
    return val, grp * m + rem // m, grp * m + rem % m


def sparse_swaps(dense: Tensor, current: Tensor, g: Tensor, pattern: Pattern = Pattern(), max_iters: int = 100,
                 candidates: int = 0, tol: float = 1e-9) -> tuple[Tensor, dict[str, Any]]:
    """Refine ``current`` (``[out, in]``, zeros = pruned) against ``dense`` on the Gram matrix ``g`` (``X^T X``).

    A swap is applied only if it lowers the row's error by more than ``tol`` times the row's
    dense output energy ``w^T G w`` (float noise never swaps). Returns the refined weight (float32)
    and ``{"iters", "swaps", "rows_changed", "error_before", "error_after"}`` (relative errors
    ``sum E / sum w^T G w``).
    """
    w0 = dense.float()
    wc = current.float().clone()
    gg = g.float()
    keep = wc != 0
    rows, n = wc.shape
    c = (w0 - wc) @ gg
    gdiag = torch.diagonal(gg)
    energy = ((w0 @ gg) * w0).sum(1)
    err0 = float(((w0 - wc) * c).sum())
    if pattern.is_nm:
        idx = torch.arange(n, device=gg.device).reshape(-1, pattern.m)
        gblocks = gg[idx.unsqueeze(2), idx.unsqueeze(1)]  # the diagonal M x M blocks, [groups, m, m]
    chunk = max(1, (1 << 24) // max(1, (candidates or n) ** 2))
    active = torch.arange(rows, device=wc.device)  # rows still improving: only they are searched
    changed = torch.zeros(rows, dtype=torch.bool, device=wc.device)
    swaps = iters = 0
    for _ in range(max_iters):
        args = (w0[active], wc[active], keep[active], c[active])
        if pattern.is_nm:
            val, bi, bj = _best_nm(*args, gblocks, gdiag, pattern.m)
        else:
            val, bi, bj = _best_unstructured(*args, gg, gdiag, candidates, chunk)
        upd = val < -tol * energy[active]
        if not bool(upd.any()):
            break
        iters += 1
        r, i, j = active[upd], bi[upd], bj[upd]
        vi, wj = wc[r, i], w0[r, j]
        c[r] += vi.unsqueeze(1) * gg[i] - wj.unsqueeze(1) * gg[j]  # r_i += ŵ_i, r_j -= w_j
        wc[r, i], keep[r, i] = 0.0, False
        wc[r, j], keep[r, j] = wj, True
        changed[r] = True
        swaps += len(r)
        active = r
    err1 = float(((w0 - wc) * ((w0 - wc) @ gg)).sum())
    total = float(energy.sum())
    return wc, {"iters": iters, "swaps": swaps, "rows_changed": int(changed.sum()),
                "error_before": err0 / total if total > 0 else 0.0, "error_after": err1 / total if total > 0 else 0.0}


@dataclass(frozen=True)
class SwapsOptions(Options):
    max_iters: int = option(100, "swap iterations (one optimal swap per row each); a row stops when none improves",
                            lo=0)
    candidates: int = option(0, "0: exact search over every kept x pruned pair (the paper); K: only the K "
                             "cheapest-to-remove and K best-to-restore weights of a row (faster)", lo=0)
    skip: str = option("", "regex on qualified names left unrefined (empty = none)")

    def validate(self) -> None:
        skip_matcher(self.skip)


@REFINERS.register("swaps", help="SparseSwaps: exact 1-swaps of kept/pruned weights per row on the Gram matrix "
                                 "(N:M: inside each group)")
class SparseSwaps(Refiner):
    """SparseSwaps mask refinement (options: :class:`SwapsOptions`)."""

    name = "swaps"
    Options = SwapsOptions
    needs_moments = False
    needs_hessian = True

    def __init__(self, options: SwapsOptions | None = None) -> None:
        super().__init__(options)
        self._skip = skip_matcher(self.opts.skip)

    def refine(self, name: str, linear: nn.Module, dense: Tensor, stats: InputStats, target: Target) -> dict[str, Any]:
        o = self.opts
        if self._skip is not None and self._skip.search(name):
            return {"skipped": f"matches skip={o.skip!r}"}
        if stats is None or stats.count == 0 or stats.xtx is None:
            raise RuntimeError(f"swaps: {name} saw no calibration input")
        w = weight_view(linear)
        new, info = sparse_swaps(dense, w, stats.hessian(), target.pattern, o.max_iters, o.candidates)
        w.copy_(new.to(w.dtype))
        return info
