"""ALPS: ADMM with a penalty schedule, then a conjugate-gradient refit on the support (Meng, Behdin,
Wang, Mazumder, NeurIPS 2024, arXiv:2406.07831; reference code mazumder-lab/ALPS ``alps.py``).

The layer-wise problem ``min ||X W^T - X Ŵ^T||^2`` subject to a sparsity constraint on ``Ŵ`` is
split (their eq. 4) into a smooth part in ``B`` and the constraint on a copy ``D``:

    B ← (X^T X + ρ I)^{-1} (X^T X B_dense − V + ρ D)      (the closed-form ridge step)
    D ← projection of B + V/ρ onto the sparsity set       (keep the largest entries)
    V ← V + ρ (B − D)

with ``X^T X`` damped by 1 % of its mean diagonal and scaled to a unit diagonal (weights scaled
accordingly). The penalty follows the reference's schedule: every 3 iterations, by how much the
support moved — ×1.3 (more than 10 % of the kept entries changed), ×1.2 (more than 0.5 %),
×1.1 (any), and once the support stops moving before any increase, ρ is divided by 5 and the
iterates restart (a too-large initial ρ); it stops when the support is stable (after a first
increase), after at least 30 iterations when less than 0.03 % moves, or after 300. The projection is
per matrix (the largest ``round((1 − s) · numel)`` entries) or per group of M inputs for N:M.
Finally the kept weights are refit with 10 iterations of CG on the support (their ``cg_batch``),
which ``Ŵ`` warm-starts. This module follows the reference's arithmetic and layout (``B`` is
``[in, out]``) so that the same Hessian gives the same weights (benchmarks/parity_one_shot.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..masks import Pattern
from ..models import set_weight, weight_fp32
from ..options import Options, option
from ..registry import METHODS
from .base import CompressResult, InputStats, Method, Target
from .lstsq import cg_on_support, normalized_gram

log = logging.getLogger(__name__)


def _project(x: Tensor, kept: int, prune_n: int, nm_m: int) -> Tensor:
    """``x`` (``[in, out]``) with all but its largest entries zeroed: the ``kept`` largest of the whole
    matrix, or for N:M the ``nm_m − prune_n`` largest in every group of ``nm_m`` inputs of an output."""
    totp, cout = x.shape
    if nm_m == 0:
        d = x.clone().reshape(-1)
        _, idx = torch.topk(-d ** 2, totp * cout - kept)
        d[idx] = 0
        return d.reshape(totp, cout)
    d = x.t().reshape(totp * cout // nm_m, nm_m)
    _, idx = torch.topk(-d ** 2, prune_n, dim=1)
    d = d.scatter(1, idx, torch.zeros(d.shape[0], prune_n, dtype=d.dtype, device=d.device))
    return d.reshape(cout, totp).t()


def _support(d: Tensor, nm_m: int) -> Tensor:
    """The pruned positions as floats in the shape the reference compares them (its support-change count)."""
    return (d.t().reshape(-1, nm_m) == 0).float() if nm_m else (d.reshape(-1) == 0).float()


def alps_prune(w: Tensor, h: Tensor, sparsity: float, pattern: Pattern = Pattern(), rho: float = 0.1,
               max_iter: int = 300, update_iter: int = 3, switch_iter: int = 30, cg_iters: int = 10,
               percdamp: float = 0.01) -> tuple[Tensor, dict]:
    """Prune ``w`` (``[out, in]``) on the Gram matrix ``h`` (``X^T X`` up to a scale); returns the new weight.

    Info: ADMM iterations, the final ρ, restarts, and the relative output error before and after
    the refit (the reference's ``error``: ``tr((B − B0)^T (H B − H B0)) / tr(B0^T H B0)`` normalized).
    """
    xtx, s = normalized_gram(h.float(), percdamp)
    wf = w.float()
    ytx = torch.matmul(wf * s, xtx)  # [out, in]
    b = (wf * s).t().clone()  # [in, out]
    b_orig = b.clone()
    v = torch.zeros_like(b)
    totp, cout = b.shape
    evals, q = torch.linalg.eigh(xtx.double())
    inv = (q @ ((1 / (evals + rho)) * q).T).float()
    res0 = float(torch.sum(b_orig * ytx.T))
    params = totp * cout
    if pattern.is_nm:
        nm_m, prune_n = pattern.m, pattern.m - pattern.n
        kept = params * pattern.n / pattern.m  # the reference's k_spar (only a scale for the support test)
        d = _project(b, 0, prune_n, nm_m)
    else:
        nm_m, prune_n = 0, 0
        kept = int(round((1 - sparsity) * params))
        d = _project(b, kept, 0, 0)
    supp_prev = _support(d, nm_m)
    d_init = d.clone()
    init_rho, restarts, it = False, 0, 0
    for it in range(max_iter):
        b = inv @ (ytx.T - v + rho * d)
        d = _project((v + rho * b) / rho, kept if not nm_m else 0, prune_n, nm_m)
        v = v + rho * (b - d)
        if (it + 1) % update_iter:
            continue
        supp = _support(d, nm_m)
        change = float(torch.sum((supp - supp_prev) ** 2))
        if change / kept > 0.1:
            init_rho, rho = True, rho * 1.3
        elif change / kept > 0.005:
            init_rho, rho = True, rho * 1.2
        elif change > 0.5:
            if init_rho:
                rho *= 1.1
            else:  # the support moved a little before any increase: ρ was too large, start over smaller
                rho /= 5
                b, d, v = b_orig.clone(), d_init.clone(), torch.zeros_like(b)
                restarts += 1
        elif init_rho:
            break
        else:
            rho /= 5
        supp_prev = supp
        rho = min(rho, 1e6)
        inv = (q @ ((1 / (evals + rho)) * q).T).float()
        if it >= switch_iter and change / kept < 0.0003:
            break
    b = _project(b, kept if not nm_m else 0, prune_n, nm_m)
    err_admm = _error(xtx, b, b_orig, ytx, res0)
    b, _ = cg_on_support(xtx, ytx.T, b != 0, b, cg_iters, rtol=1e-4, stop="reference")
    info = {"iters": it + 1, "rho": rho, "restarts": restarts, "error_admm": err_admm,
            "error": _error(xtx, b, b_orig, ytx, res0)}
    return b.t() / s, info


def _error(xtx: Tensor, b: Tensor, b_orig: Tensor, ytx: Tensor, res0: float) -> float:
    """The reference's relative error ``sum diag((B − B0)^T (X^T X B − Y^T X)) / Res0``."""
    res = torch.matmul(xtx, b) - ytx.T
    return float(torch.sum(torch.diag(torch.matmul((b - b_orig).t(), res)))) / res0 if res0 else 0.0


@dataclass(frozen=True)
class ALPSOptions(Options):
    """Defaults = the reference's (``ALPS_admm(rho=0.1)``: max_iter 300, update_iter 3, switch_iter 30)."""

    rho: float = option(0.1, "initial ADMM penalty", lo=0.0, lo_open=True)
    max_iter: int = option(300, "ADMM iterations at most", lo=1)
    update_iter: int = option(3, "iterations between penalty updates", lo=1)
    switch_iter: int = option(30, "iterations before a stable support may stop the ADMM", lo=0)
    cg_iters: int = option(10, "conjugate-gradient iterations of the refit on the support", lo=0)
    percdamp: float = option(0.01, "damping of X^T X, a fraction of its mean diagonal", lo=0.0, hi=10.0)


@METHODS.register("alps", help="ALPS: ADMM with a penalty schedule, then a CG refit on the support (NeurIPS 2024)")
class ALPS(Method):
    name = "alps"
    Options = ALPSOptions
    needs_hessian = True

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        if stats is None or stats.count == 0:
            raise RuntimeError(f"alps: {name} saw no calibration input")
        o = self.opts
        w_new, info = alps_prune(weight_fp32(linear), stats.hessian(), target.sparsity, target.pattern, o.rho,
                                 o.max_iter, o.update_iter, o.switch_iter, o.cg_iters, o.percdamp)
        set_weight(linear, w_new.masked_fill_(w_new == 0, 0.0))  # no -0.0 (a bit-exact checkpoint would store it)
        return CompressResult(error=info["error"], info=info)
