"""Magnitude pruning: remove the weights of smallest absolute value.

Score ``|W_ij|``; one threshold per matrix for unstructured sparsity, per group of M input
weights for N:M (as in the Wanda repository's magnitude baseline). Needs no calibration data.
"""

from __future__ import annotations

from torch import nn

from ..masks import keep_mask
from ..models import weight_view
from ..registry import METHODS
from .base import CompressResult, InputStats, Method, Target, apply_keep_mask, diag_error


@METHODS.register("magnitude", help="|W| per matrix (or per N:M group); no calibration")
class Magnitude(Method):
    name = "magnitude"
    needs_calibration = False

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        w = weight_view(linear).float()
        keep = keep_mask(w.abs(), target.sparsity, target.pattern, per_row=False)
        err = diag_error(w, keep, stats.col_sq if stats is not None else None)
        apply_keep_mask(linear, keep)
        return CompressResult(error=err)
