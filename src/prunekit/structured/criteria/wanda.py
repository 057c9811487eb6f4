"""Structured Wanda: a unit is worth ``sum |W_ij| * ||X_j||_2`` over all of its weights.

Wanda's score (Sun et al. 2023, eq. 1) summed over the weights of a head or channel, as FLAP's
``wanda_sp`` baseline does per unit (An et al. 2024): ``X_j`` is the calibration input feature
that the weight multiplies — the block input for q/k/v and the FFN input projections, a head's
output features for the attention output projection, a channel's activation for the FFN output
projection.
"""

from __future__ import annotations

from torch import Tensor

from ...models.structure import AttentionParts, FFNParts
from ...registry import STRUCTURED
from ..base import UnitCriterion, UnitStats, group_sum


@STRUCTURED.register("wanda", help="sum of |W|·||X_j|| over each head / channel")
class StructuredWanda(UnitCriterion):
    name = "wanda"

    def head_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        d = attn.head_dim
        q = (w["q"].abs() * stats.attn_in.col_norm.unsqueeze(0)).sum(1)
        o = (w["o"].abs() * stats.attn_out.col_norm.unsqueeze(0)).sum(0)
        return group_sum(q, d) + group_sum(o, d)

    def kv_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        d, norm = attn.head_dim, stats.attn_in.col_norm.unsqueeze(0)
        return group_sum((w["k"].abs() * norm).sum(1), d) + group_sum((w["v"].abs() * norm).sum(1), d)

    def channel_scores(self, w_in: list[Tensor], w_out: Tensor, ffn: FFNParts, stats: UnitStats) -> Tensor:
        norm_in = stats.ffn_in.col_norm.unsqueeze(0)
        rows = sum((x.abs() * norm_in).sum(1) for x in w_in)
        return rows + (w_out.abs() * stats.ffn_out.col_norm.unsqueeze(0)).sum(0)
