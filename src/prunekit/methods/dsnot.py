"""DSnoT: Dynamic Sparse No Training (Zhang et al., ICLR 2024, arXiv:2310.08915).

A training-free refinement of a sparse layer. Per output row ``i`` the *expected* reconstruction
error of the sparse weight ``W'`` against the dense ``W`` is (their eq. 4)

    e_i = E[(W - W')_i x] = sum_j (W_ij - W'_ij) mu_j,        mu_j = E[x_j] over calibration tokens.

Each cycle, every row still active swaps one pruned and one kept weight:

* **grow** the pruned ``j`` whose restoration ``e_i -= W_ij mu_j`` moves ``e_i`` towards 0 the
  most per unit of input variance: among pruned weights with ``sign(W_ij mu_j) = sign(e_i)``,
  the largest ``|W_ij mu_j| / var_j^p`` (eq. 6; ``p = pow_of_var``, 1 in the reference);
* **prune** a kept ``k`` (``e_i += W'_ik mu_k``): unstructured — among kept weights whose removal
  also pulls ``e_i`` towards 0 (``sign(W'_ik mu_k) = -sign(e_i)``), the least important by the
  Wanda score ``|W'_ik| ||X_k||`` (eq. 7); N:M — the least important kept weight of the *same*
  group of M as the grown one, so every group keeps exactly N.

Stopping (the reference's rules): a row stops for good when ``|e_i| <= update_threshold``, when
a swap would flip the sign of ``e_i`` (``same_sign``; the reference checks it for N:M only),
when its candidates run out, and every row stops after ``max_cycles`` cycles (50). Each swap
keeps the row's count of non-zeros, so the sparsity never changes. ``monotone=True`` (ours)
additionally rejects a swap that would not reduce ``|e_i|``.

Scale: the reference's ``e`` is a sum over the 2048 tokens of a calibration sequence and its
threshold 0.1; ours is per token, so the default threshold is ``0.1 / 2048``.
By default, as the reference's ``--skip_layer mlp``, MLP linears are not refined (``skip``).
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


def expected_error(dense: Tensor, sparse: Tensor, mean: Tensor) -> Tensor:
    """``e_i = sum_j (W_ij - W'_ij) mu_j`` per row (float64)."""
    return ((dense.double() - sparse.double()) * mean.double().unsqueeze(0)).sum(1)


def _sorted_candidates(valid: Tensor, key: Tensor, descending: bool) -> tuple[Tensor, Tensor]:
    """Per row, column indices of the ``valid`` entries ordered by ``key`` (first = best), and their count."""
    fill = float("-inf") if descending else float("inf")
    k = torch.where(valid, key, torch.full_like(key, fill))
    return torch.sort(k, dim=1, descending=descending, stable=True).indices, valid.sum(1)


def dsnot(dense: Tensor, sparse: Tensor, mean: Tensor, var: Tensor, col_norm: Tensor, pattern: Pattern = Pattern(),
          max_cycles: int = 50, update_threshold: float = 0.1 / 2048, pow_of_var: float = 1.0,
          same_sign: bool | None = None, monotone: bool = False) -> tuple[Tensor, dict[str, Any]]:
    """Refine ``sparse`` (same shape as ``dense``, zeros = pruned) by DSnoT's grow/prune swaps.

    Returns the refined weight (float32; grown weights take their dense value) and a summary.
    """
    w0, w1 = dense.float(), sparse.float().clone()
    rows, cols = w1.shape
    keep = w1 != 0
    mu, var_, norm = mean.float(), var.float(), col_norm.float()
    same_sign = pattern.is_nm if same_sign is None else same_sign
    e = expected_error(w0, w1, mu)
    e_before = e.clone()
    grow_gain = w0 * mu.unsqueeze(0)  # restoring j changes e by -grow_gain
    prune_gain = w1 * mu.unsqueeze(0)  # removing k changes e by +prune_gain
    key = grow_gain / var_.clamp_min(1e-12).pow(pow_of_var).unsqueeze(0)
    pruned = ~keep
    g_pos, n_g_pos = _sorted_candidates(pruned & (grow_gain > 0), key, descending=True)
    g_neg, n_g_neg = _sorted_candidates(pruned & (grow_gain < 0), key, descending=False)
    wanda = w1.abs() * norm.unsqueeze(0)
    if not pattern.is_nm:
        p_neg, n_p_neg = _sorted_candidates(keep & (prune_gain < 0), wanda, descending=False)
        p_pos, n_p_pos = _sorted_candidates(keep & (prune_gain > 0), wanda, descending=False)
    ptr = torch.zeros(4, rows, dtype=torch.long, device=w1.device)  # g_pos, g_neg, p_neg, p_pos
    grown = torch.zeros_like(keep)
    active = torch.ones(rows, dtype=torch.bool, device=w1.device)
    ar = torch.arange(rows, device=w1.device)
    swaps, cycles = 0, 0
    last = cols - 1
    while cycles < max_cycles:
        active &= e.abs() > update_threshold
        if not bool(active.any()):
            break
        cycles += 1
        pos = e > 0
        g = torch.where(pos, g_pos[ar, ptr[0].clamp(max=last)], g_neg[ar, ptr[1].clamp(max=last)])
        ok = torch.where(pos, ptr[0] < n_g_pos, ptr[1] < n_g_neg)
        if pattern.is_nm:
            grp = (g - g % pattern.m).unsqueeze(1) + torch.arange(pattern.m, device=w1.device)
            cand = keep.gather(1, grp) & ~grown.gather(1, grp)
            score = torch.where(cand, wanda.gather(1, grp), torch.full_like(wanda.gather(1, grp), float("inf")))
            p = grp.gather(1, score.argmin(1, keepdim=True)).squeeze(1)
            ok &= cand.any(1)
        else:
            p = torch.where(pos, p_neg[ar, ptr[2].clamp(max=last)], p_pos[ar, ptr[3].clamp(max=last)])
            ok &= torch.where(pos, ptr[2] < n_p_neg, ptr[3] < n_p_pos)
        e_new = e - grow_gain[ar, g].double() + prune_gain[ar, p].double()
        upd = active & ok
        if same_sign:
            upd &= torch.sign(e_new) == torch.sign(e)
        if monotone:
            upd &= e_new.abs() < e.abs()
        active = upd  # a row that cannot (or may not) swap stops for good, as in the reference
        if not bool(upd.any()):
            break
        r = ar[upd]
        gi, pi = g[upd], p[upd]
        keep[r, gi] = True
        w1[r, gi] = w0[r, gi]
        keep[r, pi] = False
        w1[r, pi] = 0.0
        grown[r, gi] = True
        e = torch.where(upd, e_new, e)
        ptr[0] += (upd & pos).long()
        ptr[1] += (upd & ~pos).long()
        if not pattern.is_nm:
            ptr[2] += (upd & pos).long()
            ptr[3] += (upd & ~pos).long()
        swaps += int(upd.sum())
    info = {"cycles": cycles, "swaps": swaps, "rows_changed": int(grown.any(1).sum()),
            "mean_abs_error_before": float(e_before.abs().mean()), "mean_abs_error_after": float(e.abs().mean())}
    return w1, info


@dataclass(frozen=True)
class DSnoTOptions(Options):
    """Defaults = the reference's."""

    max_cycles: int = option(50, "swap cycles per layer", lo=0)
    update_threshold: float = option(0.1 / 2048, "a row stops when |e_i| (per-token units) falls to this", lo=0.0)
    pow_of_var: float = option(1.0, "exponent of the input variance dividing the growing criterion")
    same_sign: bool | None = option(None, "reject swaps that flip the sign of e_i (none: only for N:M, as the reference)")
    monotone: bool = option(False, "reject swaps that do not reduce |e_i| (not in the reference)")
    skip: str = option("mlp", "regex on qualified names left unrefined (reference: mlp; empty = none)")

    def validate(self) -> None:
        skip_matcher(self.skip)  # a bad regex fails now, not after the first block


@REFINERS.register("dsnot", help="DSnoT: training-free grow/prune swaps that reduce the expected reconstruction error")
class DSnoT(Refiner):
    """DSnoT refinement (options: :class:`DSnoTOptions`)."""

    name = "dsnot"
    Options = DSnoTOptions

    def __init__(self, options: DSnoTOptions | None = None) -> None:
        super().__init__(options)
        self._skip = skip_matcher(self.opts.skip)

    def refine(self, name: str, linear: nn.Module, dense: Tensor, stats: InputStats, target: Target) -> dict[str, Any]:
        o = self.opts
        if self._skip is not None and self._skip.search(name):
            return {"skipped": f"matches skip={o.skip!r}"}
        if stats is None or stats.count == 0:
            raise RuntimeError(f"dsnot: {name} saw no calibration input")
        w = weight_view(linear)
        new, info = dsnot(dense, w, stats.mean, stats.var, stats.col_norm, target.pattern, o.max_cycles,
                          o.update_threshold, o.pow_of_var, o.same_sign, o.monotone)
        w.copy_(new.to(w.dtype))
        return info
