"""OWL: outlier-weighted layerwise sparsity (Yin et al., ICML 2024, arXiv:2310.05175, Sec. 4).

Per block ``l``, the Wanda scores ``|W_ij| * ||X_j||_2`` of all its linears (on the *dense*
model's activations) are pooled; the layerwise outlier distribution is
``D_l = share of scores > M * mean(scores)``. With ``n_l = (D_l - D_min) / (D_max - D_min)``,
``density_l = (1 - S) + 2 lam (n_l - mean(n))`` — blocks with more outliers keep more weights;
sparsities stay within ``S +- lam``. Defaults are the paper's LLaMA values, ``lam = 0.08``,
``M = 5``. :func:`project_to_mean` makes the parameter-weighted mean exact and bounds
``[0, 0.99]``.

Why an extra pass: every block's sparsity depends on ``D_min``/``D_max`` over *all* blocks, so
block 0 cannot be pruned before the last block's statistics exist. The statistics therefore
come from one dense forward of the calibration set with hooks on the selected linears (input
feature norms only, no activations kept, the LM head skipped) — about a third of the sequential
engine's cost, which runs two block forwards per block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from ..calibration.context import hooked_pass
from ..masks import Pattern
from ..models import block_lookup, find_blocks, weight_view
from ..options import Options, option
from ..registry import ALLOCATORS
from .base import Allocator, minmax, project_to_mean
from ..errors import ConfigError

log = logging.getLogger(__name__)


def outlier_ratio(scores: list[Tensor], m: float) -> float:
    """Share of the pooled ``scores`` greater than ``m`` times their mean (OWL's ``D_l``)."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    thr = m * total / count
    return sum(int((s > thr).sum()) for s in scores) / count


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity ``S - 2 lam (n_l - mean(n))`` from outlier ratios (OWL eq. in Sec. 4)."""
    n = minmax(list(ratios))
    mean_n = sum(n) / len(n)
    return [sparsity - 2.0 * lam * (x - mean_n) for x in n]


def dense_input_norms(model: nn.Module, linears: Mapping[str, nn.Module], calib_ids: Tensor,
                      batch_size: int = 8) -> dict[str, Tensor]:
    """``||X_j||_2`` of each linear's input on the dense model (one forward, hooks only).

    Linears fed the same tensor (q/k/v, gate/up) share one accumulation. The forward stops after
    the last block holding a selected linear, so the LM head never runs.
    """
    path, blocks = find_blocks(model)
    block_of = block_lookup(model)
    last = max(block_of(n) for n in linears)
    sums: dict[str, Tensor] = {}
    seen: dict[int, tuple[Tensor, Tensor]] = {}
    handles = []

    def pre_hook(name: str):
        def hook(_mod, args):
            x = args[0]
            prev = seen.get(id(x))
            if prev is not None and prev[0] is x:
                part = prev[1]
            else:
                xf = x.reshape(-1, x.shape[-1]).to(torch.float32)
                part = (xf * xf).sum(0).to(torch.float64)
                seen[id(x)] = (x, part)
            sums[name] = sums[name] + part if name in sums else part.clone()
        return hook

    for name in linears:  # the model's own modules (``linears`` may hand out copies read from a checkpoint)
        handles.append(model.get_submodule(name).register_forward_pre_hook(pre_hook(name)))
    try:
        hooked_pass(model, calib_ids, batch_size, blocks[last], seen.clear)
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return {n: v.sqrt().to(torch.float32) for n, v in sums.items()}


@dataclass(frozen=True)
class OWLOptions(Options):
    lam: float = option(0.08, "largest deviation of a block's sparsity from the target", lo=0.0, hi=0.5, hi_open=True)
    m: float = option(5.0, "outlier threshold: a score is an outlier above m x the block's mean score", lo=0.0, lo_open=True)
    batch_size: int = option(8, "calibration sequences per forward of the statistics pass", lo=1)


@ALLOCATORS.register("owl", help="OWL: blocks with more Wanda-score outliers are pruned less (needs calibration)")
class OWLAllocator(Allocator):
    """OWL allocation (options: :class:`OWLOptions`)."""

    name = "owl"
    Options = OWLOptions
    needs_calibration = True

    def allocate(self, model: nn.Module, linears: dict[str, nn.Module], sparsity: float, pattern: Pattern,
                 calib_ids: Tensor | None = None) -> dict[str, float]:
        if calib_ids is None:
            raise ConfigError("owl allocation needs calibration token ids")
        norms = dense_input_norms(model, linears, calib_ids, self.opts.batch_size)
        block_of = block_lookup(model)
        blocks: dict[int, list[str]] = {}
        for n in linears:
            blocks.setdefault(block_of(n), []).append(n)
        order = sorted(blocks)
        ratios = []
        for b in order:
            scores = [weight_view(linears[n]).float().abs() * norms[n].unsqueeze(0) for n in blocks[b]]
            ratios.append(outlier_ratio(scores, self.opts.m))
        per_block = owl_sparsities(ratios, sparsity, self.opts.lam)
        raw = {n: per_block[i] for i, b in enumerate(order) for n in blocks[b]}
        params = {n: weight_view(m).numel() for n, m in linears.items()}
        self.info = {"lam": self.opts.lam, "m": self.opts.m, "outlier_ratio": dict(zip(order, ratios)),
                     "stats_pass": "one dense forward with input-norm hooks"}
        return project_to_mean(raw, params, sparsity)
