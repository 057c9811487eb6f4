"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh, 2023,
arXiv:2301.00774).

With ``H = 2 X X^T / n`` (dampened by ``λ = 0.01 * mean(diag H)``) and the upper Cholesky factor
of ``H^{-1}``, columns are processed left to right in blocks of 128. In each block the mask is
chosen by ``w_ij^2 / [H^{-1}]_jj^2`` (Algorithm 1, the OBS saliency), over the whole block for
unstructured sparsity or per group of M columns for N:M; each pruned weight's error
``(w - q) / [H^{-1}]_jj`` is propagated to the remaining columns (the OBS update, eq. 3), lazily
across blocks. Dead inputs (``H_jj = 0``) get ``H_jj = 1`` and their weights zeroed. If the
Cholesky factorisation fails, the damping is doubled and the layer retried; the report says so.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..masks import Pattern
from ..models import set_weight, weight_fp32
from ..registry import METHODS
from ..errors import ConfigError
from ..options import Options, option
from .base import CompressResult, InputStats, Method, Target

log = logging.getLogger(__name__)


def _inverse_cholesky(h: Tensor, percdamp: float, max_retries: int) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of ``(H + λI)^-1``; doubles ``percdamp`` until it succeeds."""
    diag = torch.arange(h.shape[0], device=h.device)
    mean_diag = torch.mean(torch.diag(h))
    for attempt in range(max_retries + 1):
        damp = percdamp * (2.0**attempt)
        hd = h.clone()
        hd[diag, diag] += damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0:
                return upper, damp, attempt
    raise ConfigError(
        f"SparseGPT: the Hessian is not positive definite even with damping {damp:g}; use more "
        "calibration samples or raise --option percdamp"
    )


@contextlib.contextmanager
def _single_thread():
    """The column loop is thousands of tiny ops: threads only add overhead (and thrash badly
    when other processes share the cores), so run it on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _prune_blocks(w: Tensor, hinv: Tensor, losses: Tensor, sparsity: float, prune_n: int, prune_m: int,
                  blocksize: int) -> None:
    """Algorithm 1's loop over column blocks, in place on ``w``, with the reference's arithmetic.

    Every floating-point operation that reaches the weights is the one IST-DASLab/sparsegpt's
    ``fasterprune`` performs, in the same order and memory layout, so the same Hessian gives the
    same weights bit for bit (checked by ``benchmarks/reference_parity.py``): the error of column
    ``i`` is ``(w - q) / d`` (``w`` where pruned, 0 where kept), the block update is the outer
    product ``err ⊗ Hinv[i, i:]`` subtracted, and the lazy update multiplies the ``[rows, count]``
    error matrix. Unstructured: within a block, every weight whose saliency is at most the
    ``int(numel * s)``-th smallest is pruned (the reference's ``tmp <= thresh``: one weight more
    than ``int(numel * s)`` per block, more on ties; nothing when that count is 0).
    """
    rows, cols = w.shape
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1)
        if prune_n == 0:
            sal = w1**2 / d1.reshape(1, -1) ** 2
            k = int(sal.numel() * sparsity)
            if k > 0:
                thresh = torch.kthvalue(sal.reshape(-1), k + 1).values  # = sort(sal)[k]
                pruned = sal <= thresh
            else:
                pruned = torch.zeros_like(w1, dtype=torch.bool)
        else:
            pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            if prune_n and i % prune_m == 0:
                sal = w1[:, i : i + prune_m] ** 2 / d1[i : i + prune_m].reshape(1, -1) ** 2
                pruned.scatter_(1, i + torch.topk(sal, prune_n, dim=1, largest=False).indices, True)
            col = w1[:, i]
            e = torch.where(pruned[:, i], col, 0.0) / hinv1[i, i]  # (w - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))  # OBS update of the rest of the block
            err1[:, i] = e
        losses += err1.square().sum(1) / 2  # the OBS loss (w - q)^2 / (2 d^2), per row
        # kept entries of column i are untouched by its own update (their error is 0): w1 is q
        w[:, i1:i2] = w1.masked_fill_(pruned, 0.0)
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])


def sparsegpt_prune(
    w: Tensor,
    h: Tensor,
    sparsity: float,
    pattern: Pattern = Pattern(),
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_retries: int = 10,
) -> tuple[Tensor, dict]:
    """Prune ``w`` ``[out, in]`` (float32) with Hessian ``h`` ``[in, in]``; returns the new weight.

    ``h`` is modified (dead inputs). The returned dict holds the OBS loss, the relative error
    ``tr(ΔW H ΔW^T) / tr(W H W^T)``, the damping used and the number of retries.
    """
    w = w.clone()
    w0 = w.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv, damp, retries = _inverse_cholesky(h, percdamp, max_retries)
    rows, cols = w.shape
    losses = torch.zeros(rows, device=w.device)
    prune_n, prune_m = (pattern.m - pattern.n, pattern.m) if pattern.is_nm else (0, 0)
    if prune_m:  # N:M groups must not straddle a block boundary
        blocksize = max(prune_m, blocksize - blocksize % prune_m)

    with _single_thread():
        _prune_blocks(w, hinv, losses, sparsity, prune_n, prune_m, blocksize)

    delta = w - w0
    hw = h  # undampened Hessian (dead inputs set to 1 as the reference does)
    num = float(((delta @ hw) * delta).sum())
    den = float(((w0 @ hw) * w0).sum())
    info = {"loss": float(losses.sum()), "damp": damp, "retries": retries}
    return w, {**info, "rel_error": num / den if den > 0 else 0.0}


@dataclass(frozen=True)
class SparseGPTOptions(Options):
    blocksize: int = option(128, "columns per OBS block", lo=1)
    percdamp: float = option(0.01, "damping as a fraction of mean(diag H)", lo=0.0, hi=10.0, lo_open=True, hi_open=True)
    max_retries: int = option(10, "Cholesky retries, doubling the damping each time", lo=0)


@METHODS.register("sparsegpt", help="OBS reconstruction with the inverse Hessian (block 128, damping 0.01)")
class SparseGPT(Method):
    name = "sparsegpt"
    Options = SparseGPTOptions
    needs_hessian = True

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        if stats is None or stats.count == 0:
            raise RuntimeError(f"sparsegpt: {name} saw no calibration input")
        o = self.opts
        try:
            w_new, info = sparsegpt_prune(weight_fp32(linear), stats.hessian(), target.sparsity, target.pattern,
                                          o.blocksize, o.percdamp, o.max_retries)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        if info["retries"]:
            log.warning("SparseGPT: Cholesky failed for %s; succeeded with damping %.3g after %d retries",
                        name, info["damp"], info["retries"])
        set_weight(linear, w_new)
        return CompressResult(error=info["rel_error"], info={k: info[k] for k in ("damp", "retries", "loss")})
