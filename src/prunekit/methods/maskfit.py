"""Masks that move during a block fit: straight-through training with the sparsity pattern held.

A block fit with fixed masks (:func:`~prunekit.methods.blockfit.fit_block`) can only re-weight what
the one-shot method kept; at 70 % sparsity the kept set itself is the larger error. Here each
pruned linear keeps a dense *shadow* of its weight: the forward pass sees ``shadow ⊙ mask``, the
gradient of that product is applied to the whole shadow (straight-through estimator, as in N:M
training from scratch: Zhou et al., "Learning N:M fine-grained structured sparse neural networks
from scratch", ICLR 2021), and every ``every`` steps the mask is chosen again from the shadow with
Wanda's score ``|w| * ||x_j||`` under the same structure it had:

* N:M: the ``n`` highest scores of every group of ``m`` input columns;
* otherwise: each output row keeps exactly as many weights as the one-shot method left it, so the
  layer's sparsity, its per-row counts and the allocation across layers are unchanged.

The shadow starts at the one-shot result (zeros where it pruned), so the first selection is the
one-shot mask itself; a pruned weight comes back only when the gradient has grown it above a kept
one. With ``decay`` (SR-STE's refinement) the pruned part of the shadow is also pulled towards
zero, which damps the flipping of entries near the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..masks import Pattern, nm_mask


@dataclass
class MaskRule:
    """How one weight's mask is chosen again: its pattern, its input norms and its per-row kept counts."""

    pattern: Pattern
    col_norm: Tensor  # [in_features], Wanda's ||x_j|| (any positive scale)
    row_keep: Tensor | None = None  # [out_features] kept weights per row (non-N:M patterns)
    transposed: bool = False  # the parameter is stored [in, out] (GPT-2's Conv1D)

    def select(self, shadow: Tensor) -> Tensor:
        """The keep-mask of ``shadow`` (the parameter as stored) under this rule (bool, shadow's shape)."""
        if self.transposed:
            return self._select(shadow.t()).t()
        return self._select(shadow)

    def _select(self, shadow: Tensor) -> Tensor:
        score = shadow.abs() * self.col_norm.to(shadow.device, shadow.dtype)[None, :]
        if self.pattern.is_nm:
            return nm_mask(score, self.pattern.n, self.pattern.m)
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        ranks = torch.arange(score.shape[1], device=score.device)[None, :]
        keep_sorted = ranks < self.row_keep.to(score.device)[:, None]
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, keep_sorted)


def rule_for(weight: Tensor, pattern: Pattern, col_norm: Tensor, transposed: bool = False) -> MaskRule:
    """The rule that keeps the current structure of ``weight`` (``[out, in]``; its zeros are the pruned entries):
    unstructured or N:M — structured patterns are refused by their family before any work."""
    keep = weight != 0
    return MaskRule(pattern, col_norm.detach().float().clone(), None if pattern.is_nm else keep.sum(dim=1),
                    transposed)


class LearnedMasks:
    """The shadows and masks of the weights a block fit trains with moving masks.

    Use: after ``backward`` call :meth:`load_shadows` (the optimizer then steps the dense shadows
    with the gradient of the masked weights), after ``step`` call :meth:`reselect`.
    """

    def __init__(self, rules: dict[nn.Parameter, MaskRule], every: int = 1, decay: float = 0.0) -> None:
        if every < 1:
            raise ValueError(f"every={every} must be at least 1")
        self.rules, self.every, self.decay = rules, every, decay
        self.masks = {p: p.data != 0 for p in rules}
        self.first = {p: m.clone() for p, m in self.masks.items()}
        self.shadows = {p: p.data.detach().clone() for p in rules}
        self.steps = 0

    @torch.no_grad()
    def load_shadows(self) -> None:
        """Put each dense shadow in its parameter (the gradient stays: it is the masked weight's)."""
        for p, s in self.shadows.items():
            if self.decay and p.grad is not None:  # SR-STE: the pruned part is pulled to zero
                p.grad.add_(s * (~self.masks[p]), alpha=self.decay)
            p.data.copy_(s)

    @torch.no_grad()
    def reselect(self) -> None:
        """Keep the stepped shadows, choose the masks again (every ``every`` steps) and apply them."""
        self.steps += 1
        for p, rule in self.rules.items():
            self.shadows[p].copy_(p.data)
            if self.steps % self.every == 0:
                self.masks[p] = rule.select(self.shadows[p].float())
            p.data.masked_fill_(~self.masks[p], 0.0)

    def changed(self) -> float:
        """Share of the kept weights that were not kept by the one-shot mask."""
        moved = sum(int((m & ~self.first[p]).sum()) for p, m in self.masks.items())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return moved / max(kept, 1)
