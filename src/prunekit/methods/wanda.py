"""Wanda: pruning by weights and activations (Sun et al., 2023, arXiv:2306.11695).

Score ``S_ij = |W_ij| * ||X_j||_2`` (eq. 1), where ``||X_j||_2`` is the norm of input feature
``j`` over all calibration tokens. Weights compete within each output row (per-output
comparison group, their Sec. 3), or within each group of M inputs for N:M.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..masks import keep_mask
from ..models import weight_view
from ..registry import METHODS
from .base import CompressResult, InputStats, Method, Target, apply_keep_mask, diag_error


def wanda_scores(weight: Tensor, col_norm: Tensor) -> Tensor:
    """``|W| * ||X_j||`` broadcast over rows (float32)."""
    return weight.float().abs() * col_norm.float().unsqueeze(0)


@METHODS.register("wanda", help="|W|·||X_j|| compared per output row (or per N:M group)")
class Wanda(Method):
    name = "wanda"

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        if stats is None or stats.count == 0:
            raise RuntimeError(f"wanda: {name} saw no calibration input")
        w = weight_view(linear)
        scores = wanda_scores(w, stats.col_norm)
        keep = keep_mask(scores, target.sparsity, target.pattern, per_row=True)
        err = diag_error(w.float(), keep, stats.col_sq)
        apply_keep_mask(linear, keep)
        return CompressResult(error=err)


