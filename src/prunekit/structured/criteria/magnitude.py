"""Structured magnitude: a unit is worth the sum of ``|W|`` over all of its weights (no calibration).

A query head sums its rows of q and its columns of the attention output projection; a key/value
group adds its rows of k and v; an FFN channel sums its rows of every input projection and its
column of the output projection (LLM-Pruner's and FLAP's magnitude baselines, Ma et al. 2023,
An et al. 2024).
"""

from __future__ import annotations

from torch import Tensor

from ...models.structure import AttentionParts, FFNParts
from ...registry import STRUCTURED
from ..base import UnitCriterion, UnitStats, group_sum


@STRUCTURED.register("magnitude", help="sum of |W| over each head / channel (no calibration)")
class StructuredMagnitude(UnitCriterion):
    name = "magnitude"
    needs_calibration = False

    def head_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        d = attn.head_dim
        return group_sum(w["q"].abs().sum(1), d) + group_sum(w["o"].abs().sum(0), d)

    def kv_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        d = attn.head_dim
        return group_sum(w["k"].abs().sum(1), d) + group_sum(w["v"].abs().sum(1), d)

    def channel_scores(self, w_in: list[Tensor], w_out: Tensor, ffn: FFNParts, stats: UnitStats) -> Tensor:
        return sum(x.abs().sum(1) for x in w_in) + w_out.abs().sum(0)
