"""FLAP: fluctuation-based structured pruning with bias compensation (An et al., AAAI 2024).

For an input feature ``j`` of an output projection (attention ``o``, FFN ``down``), the
*fluctuation* score is ``Var_tokens(X_j) * ||W[:, j]||_2^2`` (their eq. 5, "WIFV"): how much the
output would move if ``X_j`` were replaced by its mean. A head sums its ``head_dim`` features; a
channel is one feature. Removing the features ``R`` and adding their mean contribution
``W[:, R] E[X_R]`` to the projection's bias (their eq. 6) leaves the output's mean unchanged
(a bias is added where the architecture has none). FLAP's adaptive structure — scores
standardised per layer and one global threshold — is ``--allocation global``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...methods.base import InputStats
from ...models.structure import AttentionParts, FFNParts
from ...options import option
from ...registry import STRUCTURED
from ..base import UnitCriterion, UnitOptions, UnitStats, group_sum


def fluctuation(w_out: Tensor, stats: InputStats) -> Tensor:
    """``Var(X_j) * ||W[:, j]||^2`` for every input feature ``j`` of ``w_out`` (``[out, in]``)."""
    return stats.var * (w_out * w_out).sum(0)


def mean_bias(w: Tensor, bias: Tensor | None, removed: Tensor, mean: Tensor) -> Tensor:
    """``bias + W[:, R] E[X_R]``: the removed inputs' mean contribution folded into the bias (FLAP eq. 6)."""
    extra = w[:, removed] @ mean[removed].to(w.dtype)
    return extra if bias is None else bias.to(w.dtype) + extra


@dataclass(frozen=True)
class FLAPOptions(UnitOptions):
    bias: bool = option(True, "fold the removed features' mean contribution into the output projection's bias")


@STRUCTURED.register("flap", help="FLAP: Var(X_j)·||W[:,j]||² on the output projections, mean folded into a bias")
class FLAP(UnitCriterion):
    name = "flap"
    Options = FLAPOptions
    needs_moments = True

    def head_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        return group_sum(fluctuation(w["o"], stats.attn_out), attn.head_dim)

    def channel_scores(self, w_in: list[Tensor], w_out: Tensor, ffn: FFNParts, stats: UnitStats) -> Tensor:
        return fluctuation(w_out, stats.ffn_out)

    def compensate(self, w: Tensor, bias: Tensor | None, removed: Tensor,
                   stats: InputStats | None) -> tuple[Tensor, Tensor | None]:
        new_bias = mean_bias(w, bias, removed, stats.mean) if self.opts.bias and bool(removed.any()) else bias
        w = w.clone()
        w[:, removed] = 0
        return w, new_bias
