"""SlimGPT: structured Optimal Brain Surgeon on the output projections (Ling et al., NeurIPS 2024).

Units are groups of input columns of the attention output projection (a head: its ``head_dim``
columns; a key/value group: its heads' columns) and single columns of the FFN output projection
(channels). With ``H = X^T X`` of the projection's calibration inputs, a unit's error is
``tr(W_G (H^{-1}_{GG})^{-1} W_G^T)`` and removing it updates the remaining columns by
``-W_G (H^{-1}_{GG})^{-1} H^{-1}_{G,:}`` (:mod:`prunekit.structured.obs`). Selection is greedy:
heads one at a time (exact), channels in ``rounds`` batches (SlimGPT's batched greedy pruning),
each followed by a Schur-complement downdate of ``H^{-1}``; the final weights are the exact
least-squares optimum for the chosen set. ``bias=true`` appends a constant input so the update
also refits a bias (FLAP's mean compensation, generalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...methods.base import InputStats
from ...models.structure import AttentionParts, FFNParts
from ...options import option
from ...registry import STRUCTURED
from .. import obs
from ..base import UnitCriterion, UnitOptions, UnitStats


@dataclass(frozen=True)
class SlimGPTOptions(UnitOptions):
    percdamp: float = option(0.01, "damping added to diag(H), a fraction of its mean", lo=0.0, hi=10.0, hi_open=True)
    rounds: int = option(8, "batches of the greedy channel selection (each followed by a Hessian downdate)", lo=1)
    bias: bool = option(False, "also refit a bias of the output projection (a constant input appended to X)")


@STRUCTURED.register("slimgpt", help="SlimGPT: OBS on output-projection column groups, H = X^T X, exact LS update")
class SlimGPT(UnitCriterion):
    name = "slimgpt"
    Options = SlimGPTOptions
    needs_hessian = True

    @property
    def needs_moments(self) -> bool:  # the sums of X, for the constant feature
        return bool(self.opts.bias)

    def _system(self, w: Tensor, bias: Tensor | None, stats: InputStats) -> tuple[Tensor, Tensor]:
        """``(W, H^{-1})`` in float64, augmented by the constant feature when ``bias``."""
        w = w.to(torch.float64)
        if self.opts.bias:
            b = bias.to(torch.float64) if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            w = torch.cat([w, b.unsqueeze(1)], 1)
        return w, self._hinv(stats)

    def _hinv(self, stats: InputStats) -> Tensor:
        """The damped inverse Hessian of ``stats`` (the last two kept: selection and update share them)."""
        cache = self.__dict__.setdefault("_cache", [])
        for st, hinv in cache:
            if st is stats:
                return hinv
        h = stats.hessian().to(torch.float64) * (stats.samples / 2.0)  # X^T X
        if self.opts.bias:
            h = obs.augment(h, stats.sum, stats.count)
        hinv = obs.inverse(obs.damp_hessian(h, self.opts.percdamp))
        cache.append((stats, hinv))
        del cache[:-2]
        return hinv

    def _head_cols(self, attn: AttentionParts) -> list[Tensor]:
        return [attn.o_cols(h) for h in range(attn.heads)]

    def head_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        wo, hinv = self._system(w["o"], None, stats.attn_out)
        return torch.tensor([obs.group_error(wo, hinv, c) for c in self._head_cols(attn)])

    def channel_scores(self, w_in: list[Tensor], w_out: Tensor, ffn: FFNParts, stats: UnitStats) -> Tensor:
        wd, hinv = self._system(w_out, None, stats.ffn_out)
        return obs.column_errors(wd, hinv)[: ffn.width].float()

    def select_heads(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats, per_group: int) -> list[int]:
        wo, hinv = self._system(w["o"], None, stats.attn_out)
        gs = attn.group_size
        steps = [[g * gs + j for j in range(gs)] for _ in range(per_group) for g in range(attn.kv_heads)]
        return sorted(obs.greedy_groups(wo, hinv, self._head_cols(attn), len(steps), allowed=steps))

    def select_groups(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats, n: int) -> list[int]:
        wo, hinv = self._system(w["o"], None, stats.attn_out)
        gs = attn.group_size
        cols = [torch.cat([attn.o_cols(g * gs + j) for j in range(gs)]) for g in range(attn.kv_heads)]
        return sorted(obs.greedy_groups(wo, hinv, cols, n))

    def select_channels(self, w_in: list[Tensor], w_out: Tensor, ffn: FFNParts, stats: UnitStats, n: int) -> list[int]:
        wd, hinv = self._system(w_out, None, stats.ffn_out)
        forbid = torch.zeros(wd.shape[1], dtype=torch.bool)
        forbid[ffn.width:] = True  # the constant feature stays
        mask = obs.greedy_columns(wd, hinv, n, self.opts.rounds, forbid)
        return sorted(int(i) for i in torch.nonzero(mask).flatten())

    def compensate(self, w: Tensor, bias: Tensor | None, removed: Tensor,
                   stats: InputStats | None) -> tuple[Tensor, Tensor | None]:
        wa, hinv = self._system(w, bias, stats)
        mask = torch.zeros(wa.shape[1], dtype=torch.bool)
        mask[: w.shape[1]] = removed
        new = obs.obs_update(wa, hinv, mask)
        if self.opts.bias:
            return new[:, : w.shape[1]].to(w.dtype), new[:, -1].to(w.dtype)
        return new.to(w.dtype), bias
