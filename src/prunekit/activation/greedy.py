"""TEAL's block-wise greedy allocation of activation sparsity across a block's linears.

Liu et al. (ICLR 2025), Section 4.2 and ``teal/greedyopt.py``: inside each block, start every
linear's input at sparsity 0; repeatedly try raising each linear by one step and keep the single
step that changes the block's output least (on calibration tokens), until the parameter-weighted
mean sparsity of the block reaches the target. Steps are inversely proportional to a linear's
size, so every step adds the same amount of weighted sparsity (TEAL: ``step / weight``).

Departures: the error is the norm of the output difference over all tokens (TEAL scores the
last quarter, because its evaluation sparsifies only the second half of each sequence); the step
is relative to the block's mean linear size (TEAL's is relative to q_proj, a constant factor).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..calibration import BlockInputs
from ..models.activation import InputMask, Site
from .base import per_channel, quantile_threshold

MAX_SPARSITY = 0.99


def threshold_at(values: Tensor, sparsity: float, scale: Tensor | None = None) -> Tensor:
    """The quantile threshold of ``values`` at ``sparsity`` (see :func:`~.base.quantile_threshold`);
    with ``scale`` (``values`` are scores ``|x| * scale``), one threshold per channel on ``|x|``."""
    t = quantile_threshold(values, sparsity)
    return t if scale is None else per_channel(t, scale)


class _Sorted:
    """``|x|`` samples sorted once, so a threshold at any sparsity is one lookup."""

    def __init__(self, values: Tensor) -> None:
        self.v = values.reshape(-1).float().sort().values

    def at(self, s: float, scale: Tensor | None = None) -> Tensor:
        k = int(round(s * self.v.numel()))
        t = torch.tensor(-1.0) if k <= 0 else self.v[min(k, self.v.numel()) - 1]
        return t if scale is None else per_channel(t, scale)


def _outputs(block: nn.Module, idx: int, inputs: BlockInputs) -> list[Tensor]:
    return [inputs.call(idx, block, b) for b in range(inputs.batches)]


def _error(outs: list[Tensor], ref: list[Tensor]) -> float:
    return sum(float(torch.linalg.vector_norm((o - r).float())) for o, r in zip(outs, ref))


def greedy_sparsities(block: nn.Module, prefix: str, idx: int, inputs: BlockInputs, sites: list[Site],
                      samples: dict[str, Tensor], target: float, step: float,
                      scales: dict[str, Tensor | None] | None = None) -> dict[str, float]:
    """Per-site sparsity whose parameter-weighted mean reaches ``target`` (``input`` sites only).

    ``samples`` are the scores thresholded (``|x|``, or ``|x| * scale`` for sites with a ``scales``
    entry, whose masks then get one threshold per channel).
    """
    if not sites or target <= 0:
        return {s.name: 0.0 for s in sites}
    sorted_ = {}
    for s in sites:  # sites sharing one sample share one sort
        key = id(samples[s.name])
        sorted_.setdefault(key, _Sorted(samples[s.name]))
    lookup = {s.name: sorted_[id(samples[s.name])] for s in sites}
    scale = {s.name: (scales or {}).get(s.name) for s in sites}
    params = {s.name: s.skipped_params for s in sites}
    total = sum(params.values())
    mean = total / len(params)
    steps = {n: step * mean / p for n, p in params.items()}
    masks = {s.name: InputMask(torch.tensor(-1.0)) for s in sites}
    handles = [block.get_submodule(s.name[len(prefix) + 1:]).register_forward_pre_hook(masks[s.name]) for s in sites]
    try:
        ref = _outputs(block, idx, inputs)
        sp = {n: 0.0 for n in params}
        while sum(sp[n] * params[n] for n in sp) / total < target - 1e-9:
            best, best_err = None, float("inf")
            for n in sp:
                if sp[n] >= MAX_SPARSITY:
                    continue
                cand = min(sp[n] + steps[n], MAX_SPARSITY)
                masks[n].threshold = lookup[n].at(cand, scale[n])
                err = _error(_outputs(block, idx, inputs), ref)
                masks[n].threshold = lookup[n].at(sp[n], scale[n])
                if err < best_err:
                    best, best_err = n, err
            if best is None:
                break
            sp[best] = min(sp[best] + steps[best], MAX_SPARSITY)
            masks[best].threshold = lookup[best].at(sp[best], scale[best])
        return sp
    finally:
        for h in handles:
            h.remove()

