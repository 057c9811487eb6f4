"""Structured pruning end to end: plan, remove through the sequential engine, shrink, report.

:func:`prune_structured` is what :func:`prunekit.prune` runs for a structured pattern:

1. describe every block (:func:`~prunekit.models.structure.block_parts`) and check the pattern can
   apply to this architecture and selection (one-line :class:`~prunekit.errors.ConfigError`);
2. ``blocks``/``ffn``: rank candidates with the block criterion and remove the lowest
   (:mod:`.drop`); otherwise plan how many heads/channels each block loses (:mod:`.plan`: uniform
   or per-block rates from an allocator; :mod:`.global_plan` for ``--allocation global``);
3. run the sequential engine with :class:`~prunekit.structured.method.UnitPruner` (zeroes the
   chosen units of each block on the pruned upstream activations, compensates the output
   projections), then remove the zeroed units physically (:mod:`prunekit.models.shrink`);
4. report exact parameter counts, per-block widths and whether a stock config can express the
   result (``report.extra["structure"]``).
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import Tensor, nn

from ..allocation.base import Allocator
from ..calibration import run_sequential
from ..errors import ConfigError
from ..formats.structured import heads_refusal, save_plan
from ..masks import Pattern
from ..methods.base import Target
from ..methods.refine import RefinedMethod
from ..models import block_lookup, weight_view
from ..models.shrink import remove_channels, remove_heads
from ..models.structure import BlockParts, block_parts, require_parts
from ..report import Report, RunInfo
from .base import BlockCriterion, StructuredCriterion, UnitCriterion
from .drop import candidates, drop_ranked, how_many
from .global_plan import global_plan
from .method import UnitPruner
from .plan import BlockPlan, UnitCosts, plan_blocks, resolve_multiple, unit_costs
from .summary import param_count, structure_summary

log = logging.getLogger(__name__)


def check_structured(model: nn.Module, pattern: Pattern, criterion: StructuredCriterion,
                     selected: dict[str, nn.Module], target: float | None = None,
                     uniform: bool = True) -> list[BlockParts]:
    """Everything about the model that can fail before any work; the blocks' layout.

    With ``target`` (and ``uniform`` allocation for heads/channels/width) it also checks that the
    rounding to whole units removes something.

    Raises:
        ConfigError: the architecture has no recognisable attention/FFN for the pattern, the
            selection cuts a unit across linears, or ``target`` rounds to nothing removed.
    """
    parts = block_parts(model)
    if pattern.kind in ("heads", "width"):
        require_parts(model, "attn", parts)
    if pattern.kind in ("channels", "width", "ffn"):
        require_parts(model, "ffn", parts)
    if isinstance(criterion, UnitCriterion):
        costs = unit_costs(model, parts, selected, pattern.kind, criterion.opts.gqa)
        if target and uniform:
            multiple = resolve_multiple(criterion.opts.multiple, costs)  # 0 = auto: the multiple the prune uses
            plans = plan_blocks(costs, target, None, multiple)
            _check_removes_units(costs, plans, target, pattern.kind, multiple)
    elif target:
        _check_removes_blocks(model, parts, selected, pattern.kind, target)
    return parts


def _check_removes_blocks(model: nn.Module, parts: list[BlockParts], selected: dict[str, nn.Module], kind: str,
                          target: float) -> None:
    """``blocks``/``ffn``: the target must round to at least one removed; name the fractions that can be reached."""
    cands = candidates(parts, selected, kind, model)
    cost = {i: sum(weight_view(selected[n]).numel() for n in names) for i, names in cands.items()}
    total = sum(weight_view(m).numel() for m in selected.values())
    if how_many(cost, target * total) > 0:
        return
    one = sum(cost.values()) / len(cost) / total
    unit = "block" if kind == "blocks" else "FFN"
    most = len(cands) - 1 if kind == "blocks" else len(cands)
    reach = ", ".join(f"{k * one:.3f}" for k in range(1, min(most, 4) + 1))
    raise ConfigError(f"--sparsity {target} removes no {unit} (one {unit} is {one:.1%} of the selected weights; a "
                      f"count rounds to the nearest, half to even): use a --sparsity above {one / 2:.3f}; {kind} can reach "
                      f"{reach}{', ...' if most > 4 else ''}")


def _check_removes_units(costs: list[UnitCosts], plans: dict[int, BlockPlan], target: float, kind: str,
                         multiple: int) -> None:
    """Heads/channels/width: the plan must remove something; name the smallest step that would."""
    if any(c.removed(plans[c.index]) for c in costs):
        return
    steps = [(c.level_cost, "one head level") for c in costs if c.attn is not None and c.max_level > 0]
    steps += [(c.channel * multiple, f"{multiple} FFN channels") for c in costs if c.ffn is not None]
    total = sum(c.selected for c in costs)
    if not steps:
        raise ConfigError(f"pattern {kind}: no block has a head level or FFN channels left to remove")
    size, what = min(steps)
    n_blocks = sum(1 for c in costs if c.attn is not None or c.ffn is not None)
    frac = size * n_blocks / total
    raise ConfigError(f"--sparsity {target} removes nothing: the smallest step, {what} in every block, is "
                      f"{frac:.1%} of the selected weights; use a --sparsity above {frac / 2:.3f} (achievable: "
                      f"{frac:.3f}, {2 * frac:.3f}, ...)")


def _rates(model: nn.Module, allocator: Allocator, selected: dict[str, nn.Module], target: float, pattern: Pattern,
           calib: Tensor | None) -> dict[int, float] | None:
    """Per-block rates from a registered allocator (parameter-weighted over each block's linears); None if uniform."""
    if allocator.name == "uniform":
        return None
    alloc = allocator.allocate(model, selected, target, pattern, calib if allocator.needs_calibration else None)
    block_of = block_lookup(model)
    acc: dict[int, list[float]] = {}
    for n, s in alloc.items():
        p = weight_view(selected[n]).numel()
        a = acc.setdefault(block_of(n), [0.0, 0.0])
        a[0] += s * p
        a[1] += p
    return {b: v[0] / v[1] for b, v in acc.items()}


def _targets(costs: list[UnitCosts], plans: dict[int, BlockPlan], pattern: Pattern) -> dict[str, Target]:
    """Per-linear targets (the fraction of each linear's weights the plan removes), for the engine and report."""
    out: dict[str, Target] = {}
    for c in costs:
        p = plans[c.index]
        if c.attn is not None:
            a = c.attn
            heads = p.heads_per_group * a.kv_heads + p.groups * a.group_size
            frac = {a.q: heads / a.heads, a.o: heads / a.heads}
            if a.layout == "separate":
                frac[a.k] = frac[a.v] = p.groups / a.kv_heads
            out.update({n: Target(min(f, 0.999999), pattern) for n, f in frac.items()})
        if c.ffn is not None:
            f = p.channels / c.ffn.width
            out.update({n: Target(min(f, 0.999999), pattern) for n in c.ffn.linears})
    return out


def prune_structured(model: nn.Module, pattern: Pattern, target: float, criterion: StructuredCriterion,
                     allocator: Allocator | None, selected: dict[str, nn.Module], calib: Tensor | None, info: RunInfo,
                     batch_size: int = 8, device=None, callback: Callable | None = None, refiner=None) -> Report:
    """Remove ``target`` of the ``selected`` decoder-linear weights as whole units; the model shrinks in place.

    ``allocator``: per-block rates from a registered allocator, or ``None`` for ``--allocation global``
    (one threshold over every block's standardised unit scores, :mod:`.global_plan`).
    ``refiner``: a :class:`~prunekit.methods.refine.Refiner` that works on structured blocks (block
    reconstruction) run on each block after its units are zeroed, before it is propagated.
    """
    dense_params = param_count(model)
    allocation = "global" if allocator is None else allocator.name
    parts = check_structured(model, pattern, criterion, selected, target, uniform=allocation == "uniform")
    if isinstance(criterion, BlockCriterion):
        if allocation != "uniform":
            raise ConfigError(f"allocation {allocation!r} gives per-layer rates; pattern {pattern} removes whole "
                              f"{'blocks' if pattern.kind == 'blocks' else 'FFNs'} ranked by {criterion.name}: use "
                              "--allocation uniform")
        report = drop_ranked(model, parts, selected, pattern.kind, criterion, target, calib, batch_size, info)
        report.extra["structure"] = structure_summary(model, dense_params, None)
        report.extra["structure"]["save"] = _save_format(model)
        return report
    assert isinstance(criterion, UnitCriterion)
    costs = unit_costs(model, parts, selected, pattern.kind, criterion.opts.gqa)
    multiple = resolve_multiple(criterion.opts.multiple, costs)
    plan_info: dict = {}
    if allocator is None:
        plans, plan_info = global_plan(model, criterion, costs, target, multiple, calib, batch_size)
    else:
        rates = _rates(model, allocator, selected, target, pattern, calib)
        plans = plan_blocks(costs, target, rates, multiple)
    if target:
        _check_removes_units(costs, plans, target, pattern.kind, multiple)  # per-block rates: known only now
    plan_info.update(_predict_save(model, costs, plans))  # before any weight is touched
    pruner = UnitPruner(model, criterion, parts, costs, plans)
    driver = RefinedMethod(pruner, refiner) if refiner is not None else pruner
    targets = _targets(costs, plans, pattern)
    report = run_sequential(model, calib if driver.needs_calibration else None, driver, targets, batch_size, device,
                            callback, info=info)
    for c in costs:
        rem = pruner.removed.get(c.index)
        if rem is None:
            continue
        if c.attn is not None and rem.heads:
            remove_heads(model, c.attn, rem.heads, rem.groups)
        if c.ffn is not None and rem.channels:
            remove_channels(model, c.ffn, rem.channels)
    report.extra["structure"] = structure_summary(model, dense_params, {i: vars(p) for i, p in plans.items()})
    report.extra["structure"]["plan"] = {"multiple": multiple, "gqa": criterion.opts.gqa, **plan_info}
    report.extra["structure"]["save"] = _save_format(model)
    return report


def _predict_save(model: nn.Module, costs: list[UnitCosts], plans: dict[int, BlockPlan]) -> dict:
    """The head counts the plan leaves, checked before pruning: GQA groups whole, and whether a stock config
    can say them (else the result is saved in prunekit's format, and the user is told now, not at the save)."""
    left = set()
    for c in costs:
        if c.attn is None:
            continue
        p = plans[c.index]
        heads = c.attn.heads - p.heads_per_group * c.attn.kv_heads - p.groups * c.attn.group_size
        kv = c.attn.kv_heads - p.groups
        if kv < 1 or heads < kv or heads % kv:
            raise RuntimeError(f"plan for block {c.index} leaves {heads} heads over {kv} key/value groups (a bug)")
        left.add((heads, kv, c.attn.head_dim))
    if len(left) != 1:
        return {}
    heads, kv, d = left.pop()
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if heads == text.num_attention_heads:
        return {}
    why = heads_refusal(model.config, heads, kv, d)
    if why is None:
        return {}
    log.warning("the plan leaves %d query heads / %d key-value heads per block, which transformers refuses in a "
                "config (%s): the result will be saved in prunekit's structured format (prunekit.load_model)",
                heads, kv, why)
    return {"save_note": f"{heads} heads / {kv} key-value heads: {why}"}


def _save_format(model: nn.Module) -> dict:
    """How the model will be saved, and the parameters the saved folder holds (exact)."""
    return save_plan(model, param_count(model))


