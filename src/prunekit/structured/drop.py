"""Removing whole decoder blocks (``--pattern blocks``) or their FFN sub-blocks (``--pattern ffn``).

A :class:`~prunekit.structured.base.BlockCriterion` scores every candidate on the dense model; the
lowest-scoring ones go, as many as bring the removed weights nearest the target. A removed block
leaves the stack (``num_hidden_layers`` and per-layer config lists shrink, ``layer_idx`` is
renumbered); a removed FFN keeps its block but gets width 0 (its projections hold no weights, so
it adds nothing — or only the output projection's bias where the architecture has one).
"""

from __future__ import annotations

import logging
import time

from torch import Tensor, nn

from ..errors import ConfigError
from ..models.blocks import block_linears
from ..models.linear import weight_view
from ..models.shrink import drop_blocks, remove_channels
from ..models.structure import BlockParts
from ..report import LayerRecord, Report, RunInfo
from .base import BlockCriterion
from .passes import output_means

log = logging.getLogger(__name__)


def candidates(parts: list[BlockParts], selected: dict[str, nn.Module], kind: str,
               model: nn.Module) -> dict[int, tuple[str, ...]]:
    """``{block: its linears}`` for every block (``kind="blocks"``) or FFN whose linears are all selected."""
    out = {}
    for bp in parts:
        if kind == "blocks":
            names = tuple(block_linears(model.get_submodule(bp.prefix), bp.prefix))
        else:
            names = bp.ffn.linears if bp.ffn is not None else ()
        if names and all(n in selected for n in names):
            out[bp.index] = names
    if not out:
        raise ConfigError(f"pattern {kind}: no {'block' if kind == 'blocks' else 'FFN'} has all of its linears "
                          "selected; widen --include / --exclude")
    return out


def how_many(costs: dict[int, int], goal: float) -> int:
    """How many candidates (at their mean cost; blocks are usually equal) bring the removal nearest ``goal``."""
    mean = sum(costs.values()) / len(costs)
    return max(0, round(goal / mean))


def drop_ranked(model: nn.Module, parts: list[BlockParts], selected: dict[str, nn.Module], kind: str,
                criterion: BlockCriterion, target: float, calib: Tensor, batch_size: int, info: RunInfo) -> Report:
    """Score the candidates, remove the lowest ones, and report what went (exact counts)."""
    t0 = time.perf_counter()
    cands = candidates(parts, selected, kind, model)
    shapes = {n: tuple(weight_view(m).shape) for n, m in selected.items()}
    cost = {i: sum(weight_view(selected[n]).numel() for n in names) for i, names in cands.items()}
    total = sum(weight_view(m).numel() for m in selected.values())
    n = how_many(cost, target * total)
    n_blocks = len(parts)
    if kind == "blocks" and n >= n_blocks:
        raise ConfigError(f"sparsity {target} would remove {n} of {n_blocks} blocks; lower --sparsity")
    if n > len(cands):
        raise ConfigError(f"sparsity {target} needs {n} {kind} removed but only {len(cands)} are selected; "
                          "lower --sparsity or widen --include")
    scores = criterion.block_scores(model, calib, kind, batch_size, sorted(cands))
    gone = sorted(sorted(scores, key=lambda i: (scores[i], i))[:n])
    log.info("%s: removing %s %s (scores %s)", criterion.name, kind, gone, {i: round(scores[i], 5) for i in gone})
    removed_names = {nm for i in gone for nm in cands[i]}
    if kind == "blocks":
        drop_blocks(model, gone)
    else:
        means = _compensation(model, parts, gone, calib, batch_size) if criterion.opts.bias else {}
        for i in gone:
            remove_channels(model, parts[i].ffn, range(parts[i].ffn.width), means.get(i))
            out = model.get_submodule(parts[i].ffn.output)
            if i not in means and getattr(out, "bias", None) is not None:
                out.bias = None  # dropped outright: not even the output projection's bias remains
    secs = time.perf_counter() - t0
    layers = [LayerRecord(nm, shapes[nm], shapes[nm][0] * shapes[nm][1], target, kind,
                          1.0 if nm in removed_names else 0.0, None, 0.0) for nm in selected]
    report = info.report(layers, [], {"removed": gone, "scores": scores,
                                      **getattr(criterion, "info", {})}, t0)
    report.extra["seconds_scoring_and_removal"] = secs
    return report


def _compensation(model: nn.Module, parts: list[BlockParts], gone: list[int], calib: Tensor,
                  batch_size: int) -> dict[int, Tensor]:
    """Each dropped FFN's mean output (dense model), to become its output projection's bias.

    Raises:
        ConfigError: the FFN's output passes a norm before the residual (Gemma-2/3), so a bias on
            its projection would not add a constant.
    """
    for i in gone:
        if parts[i].ffn.contribution != parts[i].ffn.output:
            raise ConfigError(f"bias=true: block {i}'s FFN output goes through {parts[i].ffn.contribution} before the "
                              "residual add, so a constant cannot replace it; use bias=false")
    means = output_means(model, [parts[i].ffn.output for i in gone], calib, batch_size)
    return {i: means[parts[i].ffn.output] for i in gone}

