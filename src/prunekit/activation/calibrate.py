"""The block-by-block calibration of activation thresholds.

Like the pruning engine (:mod:`prunekit.calibration.engine`), every block gets the inputs the
model really passes it (:func:`~prunekit.calibration.capture_block_inputs`). For each block:

1. sample: hooks record ``|x|`` at each site for a fixed, seeded subset of the calibration
   tokens (``max_tokens`` rows, spread over all sequences); sites fed the same tensor (q/k/v,
   gate/up) share one sample. CHESS also gets the mean ``|up_proj output|`` per channel over all
   tokens.
2. thresholds: the method's quantiles at the target (uniform), or TEAL's greedy allocation.
3. install and propagate: the block runs again with its thresholds; counters measure the
   sparsity each site reaches on *all* calibration tokens, and (``propagate``) these sparsified
   outputs become the next block's inputs.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..calibration import BlockInputs, calibration_forward_context, capture_block_inputs, peak_rss_mb
from ..models import find_blocks, model_device
from ..models.structure import block_parts
from ..models.activation import INPUT, ActivationState, Counter, Site, gated_mlp
from .base import ActivationMethod
from .greedy import greedy_sparsities, threshold_at

log = logging.getLogger(__name__)


@dataclass
class BlockDone:
    """Passed to the calibration callback after each block."""

    index: int
    total: int
    seconds: float
    rel_error: float | None
    peak_rss_mb: float


def token_positions(inputs: BlockInputs, max_tokens: int, seed: int) -> list[Tensor]:
    """Per batch, the flattened token rows to sample: ``max_tokens`` spread over all (seeded)."""
    sizes = [h.shape[0] * h.shape[1] for h in inputs.hidden]
    total = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(total, generator=g)[:max_tokens].sort().values if total > max_tokens else torch.arange(total)
    out, start = [], 0
    for n in sizes:
        sel = pick[(pick >= start) & (pick < start + n)] - start
        out.append(sel)
        start += n
    return out


class _Sampler:
    """Hooks recording ``|x|`` rows at every site of one block (shared input tensors once)."""

    def __init__(self, block: nn.Module, prefix: str, sites: list[Site], need_up: bool) -> None:
        self.rows: dict[str, list[Tensor]] = {s.name: [] for s in sites}
        self.alias: dict[str, str] = {}
        self.seen: dict[int, tuple[Tensor, str]] = {}
        self.up_sum: dict[str, Tensor] = {}
        self.up_count: dict[str, int] = {}
        self.pos: Tensor | None = None
        self.handles = []
        for s in sites:
            mod = block.get_submodule(s.name[len(prefix) + 1:])
            if s.kind == INPUT:
                self.handles.append(mod.register_forward_pre_hook(self._input_hook(s.name)))
            else:
                mlp = gated_mlp(block, s.name[len(prefix) + 1:], s.name)
                self.handles.append(mlp.act_fn.register_forward_hook(self._gate_hook(s.name)))
                if need_up:
                    self.handles.append(mlp.up_proj.register_forward_hook(self._up_hook(s.name)))

    def _take(self, name: str, x: Tensor) -> None:
        prev = self.seen.get(id(x))
        if prev is not None and prev[0] is x:  # the same tensor as an earlier site: share its sample
            self.alias.setdefault(name, prev[1])
            return
        self.seen[id(x)] = (x, name)
        self.rows[name].append(x.reshape(-1, x.shape[-1])[self.pos.to(x.device)].abs())

    def _input_hook(self, name: str):
        return lambda _m, args: self._take(name, args[0])

    def _gate_hook(self, name: str):
        return lambda _m, _args, out: self._take(name, out)

    def _up_hook(self, name: str):
        def hook(_m, _args, out):
            flat = out.reshape(-1, out.shape[-1]).abs().float()
            self.up_sum[name] = self.up_sum.get(name, 0) + flat.sum(0)
            self.up_count[name] = self.up_count.get(name, 0) + flat.shape[0]
        return hook

    def new_batch(self, pos: Tensor) -> None:
        self.pos, self.seen = pos, {}

    def finish(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        for h in self.handles:
            h.remove()
        samples = {n: torch.cat(r) for n, r in self.rows.items() if r}
        for name, first in self.alias.items():
            samples[name] = samples[first]
        up = {n: self.up_sum[n] / self.up_count[n] for n in self.up_sum}
        return samples, up


def _rel_error(y: Tensor, ref: Tensor) -> float:
    den = torch.linalg.vector_norm(ref.float())
    return float(torch.linalg.vector_norm(y.float() - ref.float()) / den) if den > 0 else 0.0


def select_sites(sites: list[Site], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[Site]:
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    return [s for s in sites if (not inc or any(r.search(s.name) for r in inc)) and not any(r.search(s.name) for r in exc)]


def model_sites(model: nn.Module, method: ActivationMethod, include=(), exclude=()) -> list[list[Site]]:
    """Every block's selected sites (fails now, before any calibration, if the method cannot apply)."""
    _, blocks = find_blocks(model)
    return [select_sites(method.sites(b, p), tuple(include), tuple(exclude)) for b, p in zip(blocks, block_parts(model))]


def _block_thresholds(state: ActivationState, method: ActivationMethod, block: nn.Module, prefix: str, idx: int,
                      sites: list[Site],
                      samples: dict[str, Tensor], up: dict[str, Tensor], config, greedy: BlockInputs | None
                      ) -> dict[str, float]:
    """Thresholds of one block's sites into ``state``; returns the sparsity allocated to each site."""
    if greedy is None:
        thr = method.thresholds(sites, samples, config.sparsity, up)
        alloc = {s.name: config.sparsity for s in sites}
    else:
        scales = {s.name: method.channel_scale(s.name) for s in sites}
        scores = {n: samples[n] if c is None else samples[n].float() * c for n, c in scales.items()}
        alloc = greedy_sparsities(block, prefix, idx, greedy, sites, scores, config.sparsity, config.greedy_step, scales)
        thr = {n: threshold_at(scores[n], alloc[n], scales[n]) for n in scores}
    state.thresholds.update(thr)
    return alloc


def _install_and_run(model: nn.Module, state: ActivationState, block: nn.Module, idx: int, sites: list[Site],
                     inputs: BlockInputs, greedy: BlockInputs | None, dense_out: list[Tensor], propagate: bool
                     ) -> tuple[dict[str, float | None], float | None]:
    """Install the block's thresholds, run it on every batch counting zeros; move the inputs on."""
    counters = {}
    for s in sites:
        counters[s.name] = state.attach(model, s.name).counter = Counter()
    outs = [inputs.call(idx, block, b) for b in range(inputs.batches)]
    for s in sites:
        state.mask(s.name).counter = None
    rel = _rel_error(outs[0], dense_out[0]) if outs else None
    for b in range(inputs.batches):
        inputs.hidden[b] = outs[b] if propagate else dense_out[b]
    if greedy is not None:
        if not propagate:
            for s in sites:  # the greedy inputs move on densely too
                state.mask(s.name).threshold = torch.tensor(-1.0)
        for b in range(greedy.batches):
            greedy.hidden[b] = greedy.call(idx, block, b)
        if not propagate:
            for s in sites:
                state.mask(s.name).threshold = state.thresholds[s.name].float()
    return {n: c.sparsity for n, c in counters.items()}, rel


def calibrate(model: nn.Module, method: ActivationMethod, config, state: ActivationState, sites: list[list[Site]],
              calib_ids: Tensor, greedy_ids: Tensor | None,
              callback: Callable[[BlockDone], None] | None = None) -> dict[str, dict]:
    """Calibrate and install every block's thresholds into ``state``; per-site records for the report."""
    path, blocks = find_blocks(model)
    dev = model_device(model)
    records: dict[str, dict] = {}
    with calibration_forward_context(model):
        inputs = capture_block_inputs(model, blocks, calib_ids, config.calib.batch_size, dev)
        greedy = capture_block_inputs(model, blocks, greedy_ids, 1, dev) if greedy_ids is not None else None
        positions = token_positions(inputs, config.max_tokens, config.calib.seed)
        for idx, block in enumerate(blocks):
            t0 = time.perf_counter()
            block_sites = sites[idx]
            sampler = _Sampler(block, f"{path}.{idx}", block_sites, method.needs_up_mean)
            dense_out = []
            try:
                for b in range(inputs.batches):
                    sampler.new_batch(positions[b])
                    out = inputs.call(idx, block, b)
                    dense_out.append(out if b == 0 or not config.propagate else None)
            finally:
                samples, up = sampler.finish()
            state.sites.update({s.name: s for s in block_sites})
            alloc = _block_thresholds(state, method, block, f"{path}.{idx}", idx, block_sites, samples, up, config,
                                      greedy)
            del samples
            reached, rel = _install_and_run(model, state, block, idx, block_sites, inputs, greedy, dense_out,
                                            config.propagate)
            for s in block_sites:
                records[s.name] = {"kind": s.kind, "target": alloc[s.name], "sparsity": reached[s.name],
                                   "threshold": _summary(state.thresholds[s.name]), "width": s.width,
                                   "skipped_params": s.skipped_params}
            done = BlockDone(idx, len(blocks), time.perf_counter() - t0, rel, peak_rss_mb())
            log.info("block %d/%d: %.2fs, rel. error %s", idx + 1, len(blocks), done.seconds,
                     "n/a" if rel is None else f"{rel:.4f}")
            if callback is not None:
                callback(done)
    return records


def _summary(t: Tensor) -> float | dict[str, float]:
    if t.dim() == 0:
        return float(t)
    finite = t[torch.isfinite(t)]
    return {"channels": t.numel(), "median": float(finite.median()) if finite.numel() else float("inf"),
            "inf": int((~torch.isfinite(t)).sum())}
