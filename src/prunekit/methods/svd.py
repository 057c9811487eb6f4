"""Plain truncated SVD: every selected matrix keeps the same fraction of its rank.

``W ≈ U_k S_k V_k^T`` with ``k = round((1 - s) * min(m, n))`` for ``Target.sparsity = s``
(Eckart–Young: the Frobenius-optimal rank-``k`` approximation, data-free). The reported
``error`` is the relative squared *weight* error ``||W - W_k||_F^2 / ||W||_F^2`` (the output
error for white inputs), which equals the tail singular-value energy.
"""

from __future__ import annotations

from torch import nn

from ..models import weight_view
from ..registry import METHODS
from .base import CompressResult, InputStats, Method, Target
from .lowrank import LowRankOptions, install, rank_for, split_factors, svd_fp32, tail_energy


@METHODS.register("svd", help="truncated SVD, the same rank fraction removed from every matrix (sparsity = rank removed)")
class TruncatedSVD(Method):
    """Data-free truncated SVD (options: :class:`LowRankOptions`)."""

    name = "svd"
    Options = LowRankOptions
    needs_calibration = False
    patterns = ("unstructured",)  # removes rank, not weights
    rank_budget_option = "budget"

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        w = weight_view(linear)
        u, s, vh = svd_fp32(w)
        k = rank_for(target.sparsity, *w.shape, self.opts.budget)
        a, b = split_factors(u, s, vh, k)
        return install(linear, a, b, self.opts.factorize, {"rank_removed": 1 - k / s.numel()}, tail_energy(s, k))
