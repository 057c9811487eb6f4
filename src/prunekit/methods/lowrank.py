"""The maths shared by the low-rank methods (``svd``, ``welore``, ``svd-llm``), as pure functions.

For ``W = U S V^T`` (singular values ``s_1 >= ... >= s_r``), the best rank-``k`` approximation in
Frobenius norm keeps the ``k`` largest (Eckart–Young), and its relative squared error is the
tail energy ``sum_{i>k} s_i^2 / sum_i s_i^2``. A rank-``k`` factorization of an ``[m, n]``
matrix stores ``k (m + n)`` numbers, so it only saves memory when ``k (m + n) < m n``: removing
rank is not the same as removing parameters.

``Target.sparsity`` means, for these methods, the fraction of *rank* removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models import weight_view
from ..models.lowrank import LowRankLinear
from ..options import Options, option
from .base import CompressResult

FACTORIZE = ("auto", "always", "never")


@dataclass(frozen=True)
class LowRankOptions(Options):
    """Options of the per-matrix low-rank methods (``svd``, ``svd-llm``)."""

    factorize: str = option("auto", "auto: two factors only where they save parameters (else dense truncated)",
                            choices=FACTORIZE)
    budget: str = option("rank", "what --sparsity removes of each matrix: its rank or its parameters",
                         choices=("rank", "params"))


def svd_fp32(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD in float32 (``U [m, r]``, ``S [r]``, ``Vh [r, n]``, ``r = min(m, n)``)."""
    return torch.linalg.svd(w.float(), full_matrices=False)


def kept_rank(rank_removed: float, full_rank: int) -> int:
    """Ranks kept when removing the fraction ``rank_removed`` (at least one)."""
    return max(1, min(full_rank, int(round(full_rank * (1.0 - rank_removed)))))


def rank_for(removed: float, m: int, n: int, budget: str = "rank") -> int:
    """Rank kept for a ``[m, n]`` matrix: ``budget="rank"`` removes the fraction ``removed`` of
    its rank; ``"params"`` keeps the largest ``k`` with ``k (m + n) <= (1 - removed) m n`` (SVD-LLM's
    compression ratio), always at least one."""
    if budget == "rank":
        return kept_rank(removed, min(m, n))
    if budget == "params":
        return max(1, min(min(m, n), int((1.0 - removed) * m * n / (m + n))))
    raise ValueError(f"budget={budget!r} must be 'rank' or 'params'")


def lowrank_params(k: int, m: int, n: int) -> int:
    return k * (m + n)


def saves_params(k: int, m: int, n: int) -> bool:
    """True when the two factors are smaller than the dense ``[m, n]`` matrix."""
    return lowrank_params(k, m, n) < m * n


def max_saving_rank(m: int, n: int) -> int:
    """The largest rank whose factorization still saves parameters (``k < mn / (m+n)``)."""
    return math.ceil(m * n / (m + n)) - 1


def tail_energy(s: Tensor, k: int) -> float:
    """``sum_{i>k} s_i^2 / sum_i s_i^2``: the relative squared error of rank-``k`` truncation."""
    e = s.double().square()
    total = float(e.sum())
    return float(e[k:].sum()) / total if total > 0 else 0.0


def split_factors(u: Tensor, s: Tensor, vh: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(A, B) = (sqrt(S_k) V_k^T, U_k sqrt(S_k))`` so that ``B @ A`` is the rank-``k`` truncation."""
    r = s[:k].clamp_min(0).sqrt()
    return r.unsqueeze(1) * vh[:k], u[:, :k] * r.unsqueeze(0)


def normalized_singular_values(s: Tensor) -> Tensor:
    """WeLore's per-matrix min–max normalisation ``(s - min) / (max - min)`` (all ones if flat)."""
    s = s.double()
    lo, hi = s.min(), s.max()
    if float(hi - lo) <= 0:
        return torch.ones_like(s)
    return (s - lo) / (hi - lo)


def install(linear: nn.Module, a: Tensor, b: Tensor, factorize: str, info: dict[str, Any], error: float | None) -> CompressResult:
    """Replace ``linear`` by the factors ``B @ A`` (a :class:`LowRankLinear`) or write ``B A`` densely.

    ``factorize``: ``auto`` — factor only when it saves parameters; ``always``; ``never`` —
    keep a dense matrix holding the truncated product (no memory saved).
    """
    if factorize not in FACTORIZE:
        raise ValueError(f"factorize={factorize!r} must be one of {FACTORIZE}")
    w = weight_view(linear)
    m, n = w.shape
    k = a.shape[0]
    factor = factorize == "always" or (factorize == "auto" and saves_params(k, m, n))
    bias = getattr(linear, "bias", None)
    info = {**info, "rank": k, "full_rank": min(m, n), "lowrank": factor, "params_before": m * n,
            "params_after": lowrank_params(k, m, n) if factor else m * n}
    if factor:
        if type(linear) is not nn.Linear:
            raise ValueError(f"cannot factorize a {type(linear).__name__} (only nn.Linear); use factorize='never'")
        mod = LowRankLinear.from_factors(a, b, bias.detach() if bias is not None else None, dtype=w.dtype)
        return CompressResult(module=mod, error=error, info=info)
    w.copy_((b @ a).to(w.dtype))
    return CompressResult(error=error, info=info)
