"""Activation-aware truncation: SVD-LLM's truncation-aware data whitening (Wang et al., 2024,
arXiv:2403.07378, Sec. 3.1).

With calibration inputs ``X`` (rows = tokens) and the Cholesky factor ``H = X^T X = L L^T``, the
SVD of the *whitened* weight ``W L = U S V^T`` is truncated to rank ``k`` and mapped back:
``W' = U_k S_k V_k^T L^{-1}``. Then ``||(W - W') X^T||_F^2 = sum_{i>k} s_i^2`` (their Theorem 1):
each dropped singular value costs exactly its own energy in *output* error, so truncating the
smallest is optimal for the layer's outputs on the calibration data — unlike plain SVD, which
is optimal for the weights. The factors are ``A = sqrt(S_k) V_k^T L^{-1}`` and ``B = U_k sqrt(S_k)``.
(SVD-LLM's second stage, LoRA fine-tuning of the factors, is not done: no gradients here.)

If ``H`` is not positive definite (dead or collinear inputs), ``lambda I`` is added with
``lambda = percdamp * mean(diag H)``, doubling until the factorization succeeds; the reported
error ``tr(D H D^T) / tr(W H W^T)``, ``D = W - W'``, always uses the undamped ``H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import weight_view
from ..options import option
from ..registry import METHODS
from .base import CompressResult, InputStats, Method, Target
from .lowrank import LowRankOptions, install, rank_for, split_factors


def whitening_factor(h: Tensor, percdamp: float = 1e-4, max_retries: int = 12) -> tuple[Tensor, float]:
    """Lower Cholesky factor of ``H`` (undamped if possible) and the damping fraction used."""
    h = h.float()
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        return lower, 0.0
    mean_diag = float(torch.diag(h).mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(max_retries):
        damp = percdamp * 2.0**attempt
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            return lower, damp
    raise ConfigError(f"svd-llm: X^T X is not positive definite even with damping {damp:g}; use more calibration "
                     "samples or raise --option percdamp")


def whitened_truncation(w: Tensor, h: Tensor, k: int, percdamp: float = 1e-4) -> tuple[Tensor, Tensor, dict]:
    """``(A, B, info)`` with ``B @ A`` the truncation-aware rank-``k`` approximation of ``w``.

    ``info`` holds the relative output error ``tr(D H D^T) / tr(W H W^T)`` on ``h`` and the damping.
    """
    w = w.float()
    lower, damp = whitening_factor(h, percdamp)
    u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    a, b = split_factors(u, s, vh, k)
    a = torch.linalg.solve_triangular(lower, a, upper=False, left=False)  # A L^{-1}: solve X L = A
    d = w - b @ a
    hf = h.float()
    den = float(((w @ hf) * w).sum())
    err = float(((d @ hf) * d).sum()) / den if den > 0 else 0.0
    return a, b, {"damp": damp, "error": max(err, 0.0)}


@dataclass(frozen=True)
class SVDLLMOptions(LowRankOptions):
    percdamp: float = option(1e-4, "damping (fraction of mean(diag H)) tried first when Cholesky fails",
                             lo=0.0, hi=10.0, lo_open=True, hi_open=True)


@METHODS.register("svd-llm", help="activation-aware SVD (SVD-LLM truncation-aware whitening with chol(X^T X)); "
                                   "sparsity = rank removed")
class SVDLLM(Method):
    """Activation-aware truncated SVD (options: :class:`SVDLLMOptions`)."""

    name = "svd-llm"
    Options = SVDLLMOptions
    needs_hessian = True
    patterns = ("unstructured",)  # removes rank, not weights
    rank_budget_option = "budget"

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        if stats is None or stats.count == 0:
            raise RuntimeError(f"svd-llm: {name} saw no calibration input")
        w = weight_view(linear)
        k = rank_for(target.sparsity, *w.shape, self.opts.budget)
        a, b, info = whitened_truncation(w, stats.hessian(), k, self.opts.percdamp)
        err = info.pop("error")
        return install(linear, a, b, self.opts.factorize, {**info, "rank_removed": 1 - k / min(w.shape)}, err)
