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
from .lowrank import install, rank_for, split_factors, svd_fp32, tail_energy


@METHODS.register("svd", help="truncated SVD, the same rank fraction removed from every matrix (sparsity = rank removed)")
class TruncatedSVD(Method):
    """Data-free truncated SVD.

    Options:
        factorize: ``auto`` (factor only matrices where two factors are smaller than the dense
            one, write the others back densely truncated), ``always`` or ``never``.
        budget: ``rank`` (sparsity = fraction of each matrix's rank removed) or ``params``
            (sparsity = fraction of each matrix's parameters removed by the factorization).
    """

    name = "svd"
    needs_calibration = False

    def __init__(self, *, factorize: str = "auto", budget: str = "rank") -> None:
        if factorize not in ("auto", "always", "never"):
            raise ValueError(f"svd option factorize={factorize!r} must be auto, always or never")
        if budget not in ("rank", "params"):
            raise ValueError(f"svd option budget={budget!r} must be 'rank' or 'params'")
        self.factorize, self.budget = factorize, budget

    def compress(self, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        if target.pattern.is_nm:
            raise ValueError("svd removes rank, not weights: use --pattern unstructured")
        w = weight_view(linear)
        u, s, vh = svd_fp32(w)
        k = rank_for(target.sparsity, *w.shape, self.budget)
        a, b = split_factors(u, s, vh, k)
        return install(linear, a, b, self.factorize, {"rank_removed": 1 - k / s.numel()}, tail_energy(s, k))
