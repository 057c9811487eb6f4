"""The sequential, block-by-block compression engine (SparseGPT/Wanda's ``*_sequential``).

For each decoder block, one block at a time:

1. **Statistics pass.** Forward hooks on the block's selected linears feed their inputs to the
   method's statistics. Linears that receive the *same* input tensor (q/k/v, gate/up) share one
   statistics object, so ``X^T X`` is accumulated once, not three times. As soon as every hooked
   linear has seen its input the forward is cut short (the block's output is not needed) —
   except on the first batch, whose dense output is kept to measure the block's error.
2. **Compress** every selected linear to its target.
3. **Propagation pass.** Re-run the compressed block so the next block is calibrated on the
   compressed model's activations; these outputs replace the inputs in place.

Peak memory is the model plus one block's calibration activations (``nsamples x seqlen x
hidden``) and that block's statistics. The engine knows the ``Method`` interface only.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..methods.base import CompressResult, Method, Target
from ..models import block_linears, find_blocks, set_module, weight_view
from ..report import BlockRecord, LayerRecord, Report
from .context import BlockInputs, calibration_forward_context, capture_block_inputs

log = logging.getLogger(__name__)


class _StopBlock(Exception):
    """Every hooked linear has its statistics: the rest of this block's forward is not needed."""


@dataclass
class BlockEvent:
    """Passed to the engine's callback after each block."""

    index: int
    total: int
    record: BlockRecord
    outputs: list[Tensor] | None  # the block's (compressed) outputs, when kept


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_device_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _StatsCollector:
    """Hooks that route each linear's input to its (possibly shared) statistics."""

    def __init__(self, method: Method, modules: dict[str, nn.Module]) -> None:
        self.method = method
        self.modules = modules
        self.stats = {name: method.init_stats(m) for name, m in modules.items()}
        self.grouped = False  # sharing is decided on the first batch
        self.seen: dict[int, tuple[Tensor, object]] = {}
        self.fired: set[str] = set()
        self.early_exit = False
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_mod, args):
            x = args[0]
            st = self.stats[name]
            prev = self.seen.get(id(x))
            if prev is not None and prev[0] is x:
                if not self.grouped and prev[1] is not st:
                    self.stats[name] = prev[1]  # same input as an earlier linear: share
                elif prev[1] is not st:  # grouped differently on a later batch: keep them apart
                    self.method.update_stats(st, x)
            else:
                self.method.update_stats(st, x)
                self.seen[id(x)] = (x, st)  # keep x alive so its id is not reused this forward
            self.fired.add(name)
            if self.early_exit and len(self.fired) == len(self.modules):
                raise _StopBlock

        return hook

    def end_batch(self) -> None:
        self.grouped = True
        self.seen.clear()
        self.fired.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def groups(self) -> int:
        return len({id(s) for s in self.stats.values()})


def _rel_error(y: Tensor, y_ref: Tensor) -> float:
    y, y_ref = y.float(), y_ref.float()
    den = torch.linalg.vector_norm(y_ref)
    return float(torch.linalg.vector_norm(y - y_ref) / den) if den > 0 else 0.0


def _layer_record(name: str, module: nn.Module, target: Target, res: CompressResult, secs: float) -> LayerRecord:
    mod = res.module if res.module is not None else module
    nnz = getattr(mod, "nonzero_params", None)
    w = weight_view(module)
    params = w.numel()
    if callable(nnz):  # replacement modules (low rank) report their own size
        sparsity = 1.0 - nnz() / params
    else:
        sparsity = float((weight_view(mod) == 0).sum()) / params
    return LayerRecord(name, tuple(w.shape), params, target.sparsity, str(target.pattern), sparsity, res.error, secs, res.info)


def run_sequential(
    model: nn.Module,
    calib_ids: Tensor | None,
    method: Method,
    targets: dict[str, Target],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    callback: Callable[[BlockEvent], None] | None = None,
    keep_outputs: bool = False,
) -> Report:
    """Compress ``targets`` (qualified linear name → :class:`Target`) block by block.

    Args:
        model: a causal LM (on its own device; blocks are moved to ``device`` one at a time if
            they differ).
        calib_ids: ``[n, seqlen]`` token ids; ``None`` only for methods without calibration.
        method: the compression method.
        targets: which linears to compress and to what.
        batch_size: calibration sequences per block forward.
        device: compute device; ``None`` = the model's device.
        callback: called after every block with a :class:`BlockEvent` (progress bars, tests).
        keep_outputs: hand each block's outputs to the callback (the last block's included).
    """
    t_start = time.perf_counter()
    path, blocks = find_blocks(model)
    home = _model_device(model)
    dev = torch.device(device) if device is not None else home
    report = Report(method=method.name, target_sparsity=0.0, pattern="")
    calibrated = method.needs_calibration or keep_outputs
    if calibrated and calib_ids is None:
        raise ValueError(f"method {method.name!r} needs calibration token ids")

    method.prepare({n: m for i, b in enumerate(blocks) for n, m in block_linears(b, f"{path}.{i}").items()
                    if n in targets}, targets)
    with calibration_forward_context(model):
        inputs = BlockInputs()
        if calibrated:
            if dev != home:
                _move_except_blocks(model, blocks, dev)
            inputs = capture_block_inputs(model, blocks[0], calib_ids, batch_size, dev)
            if dev != home:
                _move_except_blocks(model, blocks, home)
        for idx, block in enumerate(blocks):
            t0 = time.perf_counter()
            block.to(dev)
            prefix = f"{path}.{idx}"
            modules = {n: m for n, m in block_linears(block, prefix).items() if n in targets}
            ref_out = None
            results: dict[str, tuple[CompressResult, float]] = {}
            collector = None
            if modules and method.needs_calibration:
                collector = _StatsCollector(method, modules)
                try:
                    for b in range(len(inputs.hidden)):
                        collector.early_exit = b > 0
                        try:
                            out = inputs.call(block, b)
                            if b == 0:
                                ref_out = out
                        except _StopBlock:
                            pass
                        collector.end_batch()
                finally:
                    collector.remove()
                log.debug("block %d: %d linears, %d statistics groups", idx, len(modules), collector.groups())
            elif modules and calibrated:
                ref_out = inputs.call(block, 0)
            for name, mod in modules.items():
                tl = time.perf_counter()
                res = method.compress(mod, collector.stats[name] if collector else None, targets[name])
                if res.module is not None:
                    set_module(model, name, res.module)
                results[name] = (res, time.perf_counter() - tl)
            if collector is not None:
                del collector
            # propagate: the next block sees this block's compressed outputs
            rel = None
            is_last = idx == len(blocks) - 1
            if calibrated and (not is_last or keep_outputs):
                for b in range(len(inputs.hidden)):
                    inputs.hidden[b] = inputs.call(block, b)
                if ref_out is not None:
                    rel = _rel_error(inputs.hidden[0], ref_out)
            elif ref_out is not None:
                rel = _rel_error(inputs.call(block, 0), ref_out)
            for name, (res, secs) in results.items():
                report.layers.append(_layer_record(name, modules[name], targets[name], res, secs))
            if dev != home:
                block.to(home)
            rec = BlockRecord(idx, time.perf_counter() - t0, rel, peak_rss_mb(), _peak_device_mb(dev))
            report.blocks.append(rec)
            log.info("block %d/%d: %.2fs, rel. error %s, peak RSS %.0f MB", idx + 1, len(blocks), rec.seconds,
                     "n/a" if rel is None else f"{rel:.4f}", rec.peak_rss_mb)
            if callback is not None:
                callback(BlockEvent(idx, len(blocks), rec, inputs.hidden if keep_outputs else None))
    report.seconds = time.perf_counter() - t_start
    return report


def _move_except_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move everything but the decoder blocks (embeddings, rotary, norms) to ``device``."""
    block_ids = {id(b) for b in blocks}
    for mod in model.modules():
        if id(mod) in block_ids or mod is blocks:
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, buf in mod.named_buffers(recurse=False):
            setattr(mod, name, buf.to(device))
