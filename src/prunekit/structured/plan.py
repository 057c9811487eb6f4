"""From a target (and per-block rates) to how many heads, groups and channels each block loses.

``--sparsity S`` is the fraction of the *selected* decoder-linear weights removed, as for the
unstructured patterns. Structured units are coarse — on SmolLM2 one query head per key/value
group is a quarter of a block's attention — so the target is met by rounding:

* attention: a *level* is one query head removed from every key/value group (``gqa=heads``, the
  groups stay equal, so the config stays valid) or one whole key/value group with its query heads
  (``gqa=groups``; multi-head attention always works this way);
* FFN: channels in multiples of ``multiple`` (wide matmuls run fastest at widths that are a
  multiple of the vector/tile size; see docs/structured.md for the measurement).

For ``width`` each block's budget goes first to attention (the nearest level to the block's rate
times its attention weights), the rest to channels. Uniform allocation gives every block the same
plan (a stock config can express it); per-block rates (OWL, AlphaPruning, the global threshold)
are rounded per block and then corrected greedily, one channel multiple (or level) at a time,
toward the exact target. The achieved count is exact and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..models.linear import weight_view
from ..models.structure import AttentionParts, BlockParts, FFNParts


@dataclass
class BlockPlan:
    """What one block loses."""

    heads_per_group: int = 0  # query heads removed from every key/value group
    groups: int = 0  # key/value groups removed (with their query heads)
    channels: int = 0  # FFN channels removed


@dataclass
class UnitCosts:
    """One block's prunable parts and the weights each unit holds (biases excluded, as in sparsity)."""

    index: int
    attn: AttentionParts | None
    ffn: FFNParts | None
    selected: int  # weights of the block's selected linears
    attn_weights: int = 0
    q_head: int = 0  # one query head: its q rows and o columns (fused: also its k/v rows)
    kv: int = 0  # one key/value group's own k and v rows
    channel: int = 0  # one FFN channel: its input-projection rows and output-projection column
    mode: str = "heads"  # "heads" (same number per group) | "groups"
    names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def level_cost(self) -> int:
        if self.attn is None:
            return 0
        if self.mode == "heads":
            return self.attn.kv_heads * self.q_head
        return self.attn.group_size * self.q_head + self.kv

    @property
    def max_level(self) -> int:
        if self.attn is None:
            return 0
        return self.attn.group_size - 1 if self.mode == "heads" else self.attn.kv_heads - 1

    def removed(self, plan: BlockPlan) -> int:
        """Weights ``plan`` removes from this block."""
        return (plan.heads_per_group + plan.groups) * self.level_cost + plan.channels * self.channel


def unit_costs(model, parts: list[BlockParts], selected: dict[str, object], kind: str, gqa: str) -> list[UnitCosts]:
    """Per-block costs for pattern ``kind``; a part is prunable only when all its linears are selected.

    Raises:
        ConfigError: a selection that cuts a head or channel across linears, or nothing to prune.
    """
    out = []
    for bp in parts:
        names = tuple(n for n in selected if n.startswith(bp.prefix + "."))
        sel = sum(weight_view(selected[n]).numel() for n in names)
        attn = bp.attn if kind in ("heads", "width") else None
        ffn = bp.ffn if kind in ("channels", "width") else None
        attn, ffn = _whole(attn, names), _whole(ffn, names)
        c = UnitCosts(bp.index, attn, ffn, sel, names=names)
        if attn is not None:
            get = model.get_submodule
            d, hidden_in = attn.head_dim, weight_view(get(attn.q)).shape[1]
            c.q_head = d * hidden_in + weight_view(get(attn.o)).shape[0] * d
            c.kv = 2 * d * hidden_in
            c.attn_weights = sum(weight_view(get(n)).numel() for n in attn.linears)
            c.mode = "groups" if (gqa == "groups" or attn.group_size == 1) else "heads"
            if attn.layout != "separate":  # fused multi-head: a head carries its k/v rows too
                c.mode = "groups"
        if ffn is not None:
            get = model.get_submodule
            c.channel = sum(weight_view(get(n)).shape[1] for n in ffn.inputs) + weight_view(get(ffn.output)).shape[0]
        out.append(c)
    if not any(c.attn is not None or c.ffn is not None for c in out):
        raise ConfigError(f"pattern {kind}: no block has all the linears of its "
                          f"{'attention' if kind == 'heads' else 'FFN' if kind == 'channels' else 'attention or FFN'} "
                          "selected; widen --include / --exclude")
    return out


def _whole(part, names: tuple[str, ...]):
    """``part`` if all its linears are selected, ``None`` if none is; an error if only some are."""
    if part is None:
        return None
    inside = [n in names for n in part.linears]
    if all(inside):
        return part
    if any(inside):
        missing = [n for n, ok in zip(part.linears, inside) if not ok]
        raise ConfigError(f"structured pruning removes whole heads/channels, but --include/--exclude leave out "
                          f"{missing[0]} while selecting other linears of its {type(part).__name__[:-5].lower()}; "
                          "select all of them or none")
    return None


#: a K-quant block: llama.cpp stores a weight's rows (down_proj's: the FFN width) in blocks of 256 values
KQUANT_MULTIPLE = 256


def resolve_multiple(requested: int, costs: list[UnitCosts]) -> int:
    """The channel multiple: ``requested``, or for 0 (auto) :data:`KQUANT_MULTIPLE` when it divides the width of
    every FFN being pruned — so the pruned model keeps the dense model's K-quant shapes in llama.cpp
    (docs/deploy.md) — else :data:`~prunekit.structured.base.DEFAULT_MULTIPLE`."""
    from .base import DEFAULT_MULTIPLE

    if requested:
        return requested
    widths = [c.ffn.width for c in costs if c.ffn is not None]
    return KQUANT_MULTIPLE if widths and all(w % KQUANT_MULTIPLE == 0 for w in widths) else DEFAULT_MULTIPLE


def capacity(costs: list[UnitCosts], multiple: int) -> int:
    """The most weights the pattern can remove (keeping one level of heads and one channel multiple)."""
    total = 0
    for c in costs:
        total += c.max_level * c.level_cost
        if c.ffn is not None:
            total += max(c.ffn.width - multiple, 0) * c.channel
    return total


def _block_plan(c: UnitCosts, rate: float, attn_rate: float | None, multiple: int) -> BlockPlan:
    """The nearest plan to removing ``rate`` of the block's selected weights (``attn_rate`` of its attention)."""
    budget = rate * c.selected
    plan = BlockPlan()
    if c.attn is not None:
        want = (attn_rate if attn_rate is not None else rate) * c.attn_weights if c.ffn is not None else budget
        level = min(c.max_level, max(0, round(want / c.level_cost)))
        if c.mode == "heads":
            plan.heads_per_group = level
        else:
            plan.groups = level
    if c.ffn is not None:
        left = budget - c.removed(plan)
        steps = round(left / (c.channel * multiple)) if left > 0 else 0
        plan.channels = min(max(c.ffn.width - multiple, 0), max(0, steps * multiple))
    return plan


def plan_blocks(costs: list[UnitCosts], target: float, rates: dict[int, float] | None, multiple: int,
                attn_rates: dict[int, float] | None = None) -> dict[int, BlockPlan]:
    """Per-block plans: uniform (``rates is None``: every block its nearest plan to ``target``) or per-block rates.

    With per-block rates the rounded plans are corrected greedily — one channel multiple (or one
    head level when there are no channels) at a time, in the block whose rounding left it furthest
    from its own budget — while that brings the total closer to ``target``.

    Raises:
        ConfigError: ``target`` exceeds what the pattern can remove.
    """
    total = sum(c.selected for c in costs)
    cap = capacity(costs, multiple)
    if target * total > cap:
        raise ConfigError(f"sparsity {target} needs {target * total:,.0f} weights removed but these heads/channels "
                          f"hold at most {cap:,} ({cap / total:.1%} of the selected weights); lower --sparsity or use "
                          "--pattern width / blocks")
    plans = {c.index: _block_plan(c, target if rates is None else rates[c.index],
                                  None if attn_rates is None else attn_rates.get(c.index), multiple) for c in costs}
    if rates is not None:
        _correct(costs, plans, target * total, {c.index: rates[c.index] * c.selected for c in costs}, multiple)
    return plans


def _correct(costs: list[UnitCosts], plans: dict[int, BlockPlan], goal: float, want: dict[int, float],
             multiple: int) -> None:
    by = {c.index: c for c in costs}
    for _ in range(100_000):
        err = sum(by[i].removed(p) for i, p in plans.items()) - goal  # > 0: too much removed
        best = None
        for i, p in plans.items():
            c = by[i]
            step = _step(c, p, -1 if err > 0 else 1, multiple)
            if step is None:
                continue
            new_err = err + step[1]
            if abs(new_err) < abs(err):
                gap = want[i] - c.removed(p)  # > 0: this block is under its own budget
                key = -gap if err < 0 else gap
                if best is None or key < best[0]:
                    best = (key, i, step[0])
        if best is None:
            return
        plans[best[1]] = best[2]


def _step(c: UnitCosts, p: BlockPlan, sign: int, multiple: int) -> tuple[BlockPlan, int] | None:
    """One step more (``sign=1``) or less removal in block ``c``: channels if it has an FFN, else a head level."""
    if c.ffn is not None:
        ch = p.channels + sign * multiple
        if 0 <= ch <= max(c.ffn.width - multiple, 0):
            return BlockPlan(p.heads_per_group, p.groups, ch), sign * multiple * c.channel
        return None
    if c.attn is not None:
        lv = (p.heads_per_group if c.mode == "heads" else p.groups) + sign
        if 0 <= lv <= c.max_level:
            new = BlockPlan(lv, 0, 0) if c.mode == "heads" else BlockPlan(0, lv, 0)
            return new, sign * c.level_cost
    return None
