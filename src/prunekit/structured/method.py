"""The engine side of structured pruning: a block-level :class:`~prunekit.methods.base.Method`.

The sequential engine gathers, for each block in turn, the statistics of the block's linears on
the inputs the already-pruned blocks before it produce; :class:`UnitPruner.compress_block` then
asks the criterion which heads/groups/channels to remove (as many as the block's
:class:`~prunekit.structured.plan.BlockPlan` says), zeroes them — the rows of q/k/v and the
columns of the output projection; the rows of the FFN input projections and the column of its
output projection — and lets the criterion compensate the output projection (bias, OBS update).
A zeroed unit contributes exactly nothing, so the engine's propagation sees exactly the smaller
model's activations; :func:`prunekit.models.shrink` removes the units physically afterwards, from
the decisions recorded in :attr:`UnitPruner.removed`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..methods.base import CompressResult, InputStats, Method, Target
from ..models.linear import in_features, set_weight, weight_view
from ..models.shrink import new_linear_like
from ..models.structure import AttentionParts, BlockParts, FFNParts, head_weights
from .base import UnitCriterion, UnitStats
from .plan import BlockPlan, UnitCosts

log = logging.getLogger(__name__)


@dataclass
class Removal:
    """What was removed from one block (original indices)."""

    heads: list[int] = field(default_factory=list)  # query heads (those of removed groups included)
    groups: list[int] = field(default_factory=list)  # key/value groups
    channels: list[int] = field(default_factory=list)


class UnitPruner(Method):
    """Removes the planned heads/channels of each block with a :class:`UnitCriterion` (engine driver)."""

    name = "structured"
    block_level = True
    patterns = ("channels", "heads", "width")

    def __init__(self, model: nn.Module, criterion: UnitCriterion, parts: list[BlockParts], costs: list[UnitCosts],
                 plans: dict[int, BlockPlan]) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.name = criterion.name
        self.needs_calibration = criterion.needs_calibration
        self.needs_moments = criterion.needs_moments
        self.parts = {bp.index: bp for bp in parts}
        self.costs = {c.index: c for c in costs}
        self.plans = plans
        self.removed: dict[int, Removal] = {}
        self._hessian_ids: set[int] = set()
        self._block_of: dict[str, int] = {}

    def prepare(self, linears: dict[str, nn.Module], targets: dict[str, Target]) -> None:
        for c in self.costs.values():
            for n in c.names:
                self._block_of[n] = c.index
            for part in (c.attn, c.ffn):
                if part is not None and self.criterion.needs_hessian:
                    out = part.o if isinstance(part, AttentionParts) else part.output
                    self._hessian_ids.add(id(self.model.get_submodule(out)))

    def init_stats(self, linear: nn.Module) -> InputStats | None:
        if not self.needs_calibration:
            return None
        return InputStats(in_features(linear), weight_view(linear).device, hessian=id(linear) in self._hessian_ids,
                          moments=bool(self.needs_moments))

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        raise RuntimeError("UnitPruner decides per block (compress_block)")

    def compress_block(self, modules: dict[str, nn.Module], stats: dict[str, InputStats | None],
                       targets: dict[str, Target]) -> dict[str, tuple[CompressResult, float]]:
        if not modules:  # a block outside the selection
            return {}
        t0 = time.perf_counter()
        idx = self._block_of[next(iter(modules))]
        c, plan = self.costs[idx], self.plans.get(idx, BlockPlan())
        results = {n: CompressResult() for n in modules}
        removal = Removal()
        if c.attn is not None and (plan.heads_per_group or plan.groups):
            self._heads(c.attn, plan, stats, modules, results, removal)
        if c.ffn is not None and plan.channels:
            self._channels(c.ffn, plan, stats, modules, results, removal)
        self.removed[idx] = removal
        secs = time.perf_counter() - t0
        log.info("block %d: removed %d heads (%d groups), %d channels in %.2fs", idx, len(removal.heads),
                 len(removal.groups), len(removal.channels), secs)
        return {n: (r, secs / len(modules)) for n, r in results.items()}

    def _unit_stats(self, c: UnitCosts, stats: dict[str, InputStats | None]) -> UnitStats:
        a, f = c.attn, c.ffn
        return UnitStats(stats.get(a.q) if a else None, stats.get(a.o) if a else None,
                         stats.get(f.inputs[0]) if f else None, stats.get(f.output) if f else None)

    def _heads(self, attn: AttentionParts, plan: BlockPlan, stats, modules, results, removal: Removal) -> None:
        us = self._unit_stats(self.costs[self._block_of[attn.o]], stats)
        w = head_weights(self.model, attn)
        if plan.groups:
            removal.groups = self.criterion.select_groups(w, attn, us, plan.groups)
            gs = attn.group_size
            removal.heads = sorted(g * gs + j for g in removal.groups for j in range(gs))
        else:
            removal.heads = self.criterion.select_heads(w, attn, us, plan.heads_per_group)
        rows = [attn.q_rows(h) for h in removal.heads]
        if attn.layout != "separate":  # fused multi-head: a head's k/v rows live in the same matrix
            rows += [attn.k_rows(h) for h in removal.heads] + [attn.v_rows(h) for h in removal.heads]
        _zero_rows(modules[attn.q], torch.cat(rows))
        if attn.layout == "separate" and removal.groups:
            kv = torch.cat([attn.k_rows(g) for g in removal.groups])
            _zero_rows(modules[attn.k], kv)
            _zero_rows(modules[attn.v], kv)
        cols = torch.zeros(w["o"].shape[1], dtype=torch.bool)
        cols[torch.cat([attn.o_cols(h) for h in removal.heads])] = True
        results[attn.o] = self._compensate(modules[attn.o], cols, us.attn_out)

    def _channels(self, ffn: FFNParts, plan: BlockPlan, stats, modules, results, removal: Removal) -> None:
        us = self._unit_stats(self.costs[self._block_of[ffn.output]], stats)
        w_in = [weight_view(modules[n]).float() for n in ffn.inputs]
        w_out = weight_view(modules[ffn.output]).float()
        removal.channels = self.criterion.select_channels(w_in, w_out, ffn, us, plan.channels)
        rows = torch.tensor(removal.channels, dtype=torch.long)
        for n in ffn.inputs:
            _zero_rows(modules[n], rows)
        cols = torch.zeros(ffn.width, dtype=torch.bool)
        cols[rows] = True
        results[ffn.output] = self._compensate(modules[ffn.output], cols, us.ffn_out)

    def _compensate(self, linear: nn.Module, removed: Tensor, stats: InputStats | None) -> CompressResult:
        """Zero the removed input columns and apply the criterion's compensation (a bias may be added)."""
        w = weight_view(linear).float()
        bias = linear.bias.detach().float() if getattr(linear, "bias", None) is not None else None
        new_w, new_b = self.criterion.compensate(w, bias, removed, stats)
        new_w[:, removed] = 0
        err = _diag_error(w, new_w, stats)
        if new_b is not None and bias is None:  # the architecture has no bias here: add one
            mod = new_linear_like(linear, w.shape[0], w.shape[1], True)
            with torch.no_grad():
                set_weight(mod, new_w.to(mod.weight.dtype))
                mod.bias.copy_(new_b.to(mod.bias.dtype))
            return CompressResult(module=mod, error=err, info={"bias_added": True})
        with torch.no_grad():
            set_weight(linear, new_w.to(linear.weight.dtype))
            if new_b is not None:
                linear.bias.copy_(new_b.to(linear.bias.dtype))
        return CompressResult(error=err)


def _zero_rows(linear: nn.Module, rows: Tensor) -> None:
    """Zero output rows (and their bias entries) of ``linear`` in place."""
    w = weight_view(linear)
    w[rows.to(w.device)] = 0
    if getattr(linear, "bias", None) is not None:
        linear.bias.data[rows.to(linear.bias.device)] = 0


def _diag_error(w: Tensor, new_w: Tensor, stats: InputStats | None) -> float | None:
    """``||(W - W') X||^2 / ||W X||^2`` with the diagonal of ``X^T X`` (the layer's own error estimate)."""
    if stats is None or stats.samples == 0:
        return None
    col_sq = stats.col_sq.to(w.dtype)
    total = float((w * w * col_sq).sum())
    d = w - new_w
    return float((d * d * col_sq).sum()) / total if total > 0 else 0.0
