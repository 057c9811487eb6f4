"""FLAP's adaptive structure search: standardised unit scores, one global threshold (``--allocation global``).

FLAP (An et al., AAAI 2024, Sec. 3.3, "AL-AM") standardises the scores of each layer's units —
``z = (s - mean) / std`` within one block's heads, and within its channels — so that layers of
different scale compare, then removes the lowest ``z`` of the whole model, counting each unit by
the weights it holds, until the target is met. Every block then gets its own number of heads and
channels. Here any unit criterion can be used (the pattern's default unless ``--method`` names
one), on one *dense* pass over the calibration set — every block's scores must exist before the
first block is pruned; the sequential engine then re-selects the units inside each block on the
pruned upstream activations.

Units are ranked in the granularity they are removed in: a *level* of heads (one query head of
every key/value group: the mean ``z`` of each group's next-lowest head, or a whole group) and a
*run* of ``multiple`` channels (the mean ``z`` of the next ``multiple`` lowest channels). Within
a block these are increasing, so a global sort yields a valid per-block prefix.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..methods.base import InputStats
from ..models.linear import in_features, weight_view
from ..models.structure import head_weights
from .base import UnitCriterion, UnitStats
from .passes import dense_stats
from .plan import BlockPlan, UnitCosts, _correct, capacity

log = logging.getLogger(__name__)


def standardize(x: Tensor) -> Tensor:
    """``(x - mean) / std`` (zeros when all equal)."""
    x = x.double()
    sd = float(x.std()) if x.numel() > 1 else 0.0
    return (x - x.mean()) / sd if sd > 0 else torch.zeros_like(x)


def _level_scores(crit: UnitCriterion, model: nn.Module, c: UnitCosts, us: UnitStats) -> list[float]:
    attn = c.attn
    w = head_weights(model, attn)
    if c.mode == "heads":
        z = standardize(crit.head_scores(w, attn, us)).reshape(attn.kv_heads, attn.group_size)
        ordered = torch.sort(z, dim=1).values
        return [float(ordered[:, r].mean()) for r in range(c.max_level)]
    z = torch.sort(standardize(crit.group_scores(w, attn, us))).values
    return [float(z[r]) for r in range(c.max_level)]


def _run_scores(crit: UnitCriterion, model: nn.Module, c: UnitCosts, us: UnitStats, multiple: int) -> list[float]:
    ffn = c.ffn
    get = model.get_submodule
    w_in = [weight_view(get(n)).float() for n in ffn.inputs]
    z = torch.sort(standardize(crit.channel_scores(w_in, weight_view(get(ffn.output)).float(), ffn, us))).values
    runs = max(ffn.width - multiple, 0) // multiple
    return [float(z[r * multiple:(r + 1) * multiple].mean()) for r in range(runs)]


def _stats(model: nn.Module, crit: UnitCriterion, costs: list[UnitCosts], calib: Tensor | None,
           batch_size: int) -> dict[int, UnitStats]:
    if not crit.needs_calibration:
        return {c.index: UnitStats() for c in costs}
    roles: dict[str, tuple[int, str]] = {}
    for c in costs:
        if c.attn is not None:
            roles[c.attn.q], roles[c.attn.o] = (c.index, "attn_in"), (c.index, "attn_out")
        if c.ffn is not None:
            roles[c.ffn.inputs[0]], roles[c.ffn.output] = (c.index, "ffn_in"), (c.index, "ffn_out")
    outputs = {n for n, (_, r) in roles.items() if r.endswith("_out")}

    def make(name: str, mod: nn.Module) -> InputStats:
        return InputStats(in_features(mod), weight_view(mod).device, hessian=crit.needs_hessian and name in outputs,
                          moments=bool(crit.needs_moments))

    linears = {n: model.get_submodule(n) for n in roles}
    stats = dense_stats(model, linears, calib, batch_size, make)
    out = {c.index: UnitStats() for c in costs}
    for n, (i, role) in roles.items():
        setattr(out[i], role, stats[n])
    return out


def global_plan(model: nn.Module, crit: UnitCriterion, costs: list[UnitCosts], target: float, multiple: int,
                calib: Tensor | None, batch_size: int = 8) -> tuple[dict[int, BlockPlan], dict]:
    """Per-block plans from one global threshold on standardised scores (see the module docstring)."""
    total = sum(c.selected for c in costs)
    goal = target * total
    if goal > capacity(costs, multiple):
        from .plan import plan_blocks

        plan_blocks(costs, target, None, multiple)  # raises the capacity error
    stats = _stats(model, crit, costs, calib, batch_size)
    cands: list[tuple[float, int, str, int]] = []  # (score, block, kind, cost)
    for c in costs:
        if c.attn is not None:
            cands += [(s, c.index, "attn", c.level_cost) for s in _level_scores(crit, model, c, stats[c.index])]
        if c.ffn is not None:
            cands += [(s, c.index, "ffn", multiple * c.channel)
                      for s in _run_scores(crit, model, c, stats[c.index], multiple)]
    order = sorted(range(len(cands)), key=lambda k: cands[k][0])
    cum, best, best_k = 0, abs(goal), 0
    for k, j in enumerate(order, 1):
        cum += cands[j][3]
        if abs(cum - goal) < best:
            best, best_k = abs(cum - goal), k
    plans = {c.index: BlockPlan() for c in costs}
    by = {c.index: c for c in costs}
    for j in order[:best_k]:
        _, i, kind, _ = cands[j]
        p = plans[i]
        if kind == "ffn":
            p.channels += multiple
        elif by[i].mode == "heads":
            p.heads_per_group += 1
        else:
            p.groups += 1
    _correct(costs, plans, goal, {i: by[i].removed(p) for i, p in plans.items()}, multiple)
    threshold = cands[order[best_k - 1]][0] if best_k else None
    info = {"threshold_z": threshold, "units_ranked": len(cands)}
    log.info("global threshold z=%s over %d ranked units", threshold, len(cands))
    return plans, info
