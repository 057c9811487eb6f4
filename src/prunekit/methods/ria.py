"""RIA: relative importance and activations (Zhang, Zhao, Lin, et al., "Plug-and-play: an efficient
post-training pruning method for large language models", ICLR 2024; reference code
biomedical-cybernetics/Relative-importance-and-activation-pruning ``lib/prune.py``, ``prune_ria``).

Score (their eq. 3, with the reference's arithmetic)::

    RIA_ij = ( |W_ij| / sum_i' |W_i'j|  +  |W_ij| / sum_j' |W_ij'| ) * ( ||X_j||_2 )^a ,   a = 0.5

— a weight's share of its input channel's (column's) total plus its share of its output row's
total, times the input feature's activation norm (Wanda's ``sqrt(scaler_row)``) to the power ``a``.
Unstructured: one threshold per matrix, the reference's default and its rule — every score at most
the ``int(numel * s)``-th smallest is pruned (one weight more than ``int(numel * s)``, more on ties,
as the magnitude / SparseGPT reference code does; see :mod:`prunekit.masks`); ``per_row=true``:
Wanda's per-output-row rule (the reference's ``--per_outneuron``). N:M: per group of M inputs,
optionally after RIA's channel permutation (:mod:`~prunekit.methods.nm_permute`; ``permute=true``,
the paper's "+CP").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..masks import keep_mask
from ..models import weight_view
from ..options import Options, option
from ..registry import METHODS
from .base import CompressResult, InputStats, Method, Target, apply_keep_mask, diag_error
from .nm_permute import permuted_nm_mask


def matrix_threshold_mask(scores: Tensor, sparsity: float) -> Tensor:
    """The reference's per-matrix rule: prune every score ``<= sorted(scores)[int(numel * s)]`` (none at s = 0)."""
    k = int(scores.numel() * sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    thresh = torch.sort(scores.flatten())[0][k]
    return scores > thresh


def ria_scores(weight: Tensor, col_norm: Tensor, a: float = 0.5) -> Tensor:
    """``(|W| / column sums + |W| / row sums) * col_norm**a`` (float32; ``col_norm`` = Wanda's ``sqrt(scaler_row)``)."""
    w = weight.float().abs()
    return (w / w.sum(dim=0) + w / w.sum(dim=1).reshape(-1, 1)) * col_norm.float().reshape(1, -1) ** a


@dataclass(frozen=True)
class RIAOptions(Options):
    """Defaults = the reference's (``--a 0.5``; per matrix; no channel permutation unless asked)."""

    a: float = option(0.5, "exponent of the activation norm", lo=0.0)
    per_row: bool = option(False, "compare within each output row (Wanda's rule) instead of the whole matrix")
    permute: bool = option(False, "N:M: permute input channels first (reallocation + linear sum assignment, RIA's CP)")
    lsa: bool = option(True, "with permute: refine the reallocation by linear sum assignment (needs scipy)")


@METHODS.register("ria", help="RIA: relative importance x activation^0.5, per matrix; N:M with optional channel "
                              "permutation (ICLR 2024)")
class RIA(Method):
    name = "ria"
    Options = RIAOptions

    def __init__(self, options: RIAOptions | None = None) -> None:
        super().__init__(options)
        self.permutations: dict[str, Tensor] = {}  # N:M with permute: each layer's input order

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        if stats is None or stats.count == 0:
            raise RuntimeError(f"ria: {name} saw no calibration input")
        o = self.opts
        w = weight_view(linear)
        scores = ria_scores(w, stats.col_norm, o.a)
        info = {}
        if target.pattern.is_nm and o.permute:
            keep, perm, info = permuted_nm_mask(scores, target.pattern.n, target.pattern.m, o.lsa)
            self.permutations[name] = perm
            info["nm_in_stored_order"] = False
        elif target.pattern.is_nm or o.per_row:
            keep = keep_mask(scores, target.sparsity, target.pattern, per_row=True)
        else:
            keep = matrix_threshold_mask(scores, target.sparsity)
        err = diag_error(w.float(), keep, stats.col_sq)
        apply_keep_mask(linear, keep)
        return CompressResult(error=err, info=info)
