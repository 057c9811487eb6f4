"""The sequential, block-by-block compression engine (SparseGPT/Wanda's ``*_sequential``).

Before the loop, :func:`~prunekit.calibration.context.capture_block_inputs` records block 0's
calibration hidden states and the arguments the model passes to *every* block. Then, one block
at a time, in three steps:

1. :func:`collect` — forward hooks on the block's selected linears feed their inputs to the
   method's statistics. Linears that receive the *same* input tensor (q/k/v, gate/up) share one
   statistics object, so ``X^T X`` is accumulated once, not three times. As soon as every hooked
   linear has seen its input the forward is cut short (the block's output is not needed) —
   except on the first batch, whose dense output is kept to measure the block's error.
2. :func:`compress` — every selected linear to its target (masked in place or replaced).
3. :func:`propagate` — re-run the compressed block so the next block is calibrated on the
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

from ..errors import ConfigError
from ..methods.base import CompressResult, InputStats, Method, Target
from ..models import block_linears, find_blocks, model_device, set_module, weight_view
from ..report import BlockRecord, LayerRecord, Report, RunInfo
from .context import BlockInputs, calibration_forward_context, capture_block_inputs
from .residency import InMemory, Streamed

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


def _rel_error(y: Tensor, y_ref: Tensor) -> float:
    y, y_ref = y.float(), y_ref.float()
    den = torch.linalg.vector_norm(y_ref)
    return float(torch.linalg.vector_norm(y - y_ref) / den) if den > 0 else 0.0


def collect(index: int, block: nn.Module, inputs: BlockInputs, method: Method,
            modules: dict[str, nn.Module]) -> tuple[dict[str, InputStats | None], Tensor | None]:
    """Step 1: the statistics of ``modules`` on the block's inputs, and the dense output of batch 0."""
    if not modules or not method.needs_calibration:
        ref = inputs.call(index, block, 0) if modules and inputs.batches else None
        return {name: None for name in modules}, ref
    collector = _StatsCollector(method, modules)
    ref = None
    try:
        for b in range(inputs.batches):
            collector.early_exit = b > 0
            try:
                out = inputs.call(index, block, b)
                if b == 0:
                    ref = out
            except _StopBlock:
                pass
            collector.end_batch()
    finally:
        collector.remove()
    _check_finite_stats(collector.stats)
    return collector.stats, ref


def _check_finite_stats(stats: dict[str, InputStats | None]) -> None:
    """A NaN/Inf statistic (activations that overflowed) would be compressed into garbage silently."""
    for name, st in stats.items():
        if st is None:
            continue
        bad = not bool(torch.isfinite(st.scaler).all()) or (st.xtx is not None and not bool(torch.isfinite(st.xtx).all()))
        if bad:
            raise ConfigError(f"the calibration inputs of {name} are not finite (NaN/Inf activations: an overflow in "
                              "float16, or broken weights upstream); use --dtype bfloat16 or float32, or reload the model")


def compress(model: nn.Module, modules: dict[str, nn.Module], stats: dict[str, InputStats | None], method: Method,
             targets: dict[str, Target]) -> list[LayerRecord]:
    """Step 2: compress the block's linears (in place, or swapped for the method's replacements).

    Methods that decide per linear are called once per linear; methods that decide for the whole
    block at once (structured pruning: a channel spans gate, up and down) implement
    :meth:`~prunekit.methods.base.Method.compress_block` and return their results per linear.
    """
    t0 = time.perf_counter()
    results = method.compress_block(modules, stats, targets)
    per_linear = (time.perf_counter() - t0) / max(len(modules), 1) if method.block_level else None
    records = []
    for name, mod in modules.items():
        res, secs = results[name]
        if res.module is not None:
            set_module(model, name, res.module)
        records.append(_layer_record(name, mod, targets[name], res, secs if per_linear is None else per_linear))
    return records


def propagate(index: int, block: nn.Module, inputs: BlockInputs, ref: Tensor | None, keep: bool) -> float | None:
    """Step 3: the compressed block's outputs become the next block's inputs (when ``keep``).

    Returns the relative error of batch 0's output against the dense ``ref`` (``None`` without one).
    """
    if keep:
        for b in range(inputs.batches):
            inputs.hidden[b] = inputs.call(index, block, b)
        return _rel_error(inputs.hidden[0], ref) if ref is not None else None
    return _rel_error(inputs.call(index, block, 0), ref) if ref is not None else None


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


def _one_block(model: nn.Module, prefix: str, idx: int, block: nn.Module, inputs: BlockInputs, method: Method,
               targets: dict[str, Target], keep: bool) -> tuple[list[LayerRecord], float | None]:
    """The three steps for one block: its layers' records and its output error."""
    modules = {n: m for n, m in block_linears(block, prefix).items() if n in targets}
    stats, ref = collect(idx, block, inputs, method, modules)
    layers = compress(model, modules, stats, method, targets)
    del stats
    return layers, propagate(idx, block, inputs, ref, keep)


def run_sequential(
    model: nn.Module,
    calib_ids: Tensor | None,
    method: Method,
    targets: dict[str, Target],
    batch_size: int = 8,
    device: torch.device | str | None = None,
    callback: Callable[[BlockEvent], None] | None = None,
    keep_outputs: bool = False,
    info: RunInfo | None = None,
    residency: InMemory | Streamed | None = None,
) -> Report:
    """Compress ``targets`` (qualified linear name → :class:`Target`) block by block.

    Args:
        model: a causal LM (blocks are moved to ``device`` one at a time if it is not the model's).
        calib_ids: ``[n, seqlen]`` token ids; ``None`` only for methods without calibration.
        method: the compression method.
        targets: which linears to compress and to what.
        batch_size: calibration sequences per block forward.
        device: compute device; ``None`` = the model's device.
        callback: called after every block with a :class:`BlockEvent`; with ``keep_outputs``, with its outputs.
        info: what the report says about the run (default: derived from ``method`` and ``targets``).
        residency: where the blocks live (:mod:`~prunekit.calibration.residency`): in memory
            (default), or read from the checkpoint one block at a time.

    Returns:
        The complete :class:`Report`.
    """
    t_start = time.perf_counter()
    path, blocks = find_blocks(model)
    home = model_device(model) if residency is None else residency.device
    dev = torch.device(device) if device is not None else home
    res = residency or InMemory(dev, home)
    calibrated = method.needs_calibration or keep_outputs
    if calibrated and calib_ids is None:
        raise ConfigError(f"method {method.name!r} needs calibration token ids")
    method.prepare(res.linears({n: m for i, b in enumerate(blocks) for n, m in block_linears(b, f"{path}.{i}").items()
                                if n in targets}), targets)
    layers: list[LayerRecord] = []
    records: list[BlockRecord] = []
    with calibration_forward_context(model):
        inputs = BlockInputs()
        if calibrated:
            with res.capture(model, blocks):
                inputs = capture_block_inputs(model, blocks, calib_ids, batch_size, dev, res.activations())
        for idx, block in enumerate(blocks):
            t0 = time.perf_counter()
            with res.block(idx, block):
                keep = calibrated and (idx < len(blocks) - 1 or keep_outputs)
                done, rel = _one_block(model, f"{path}.{idx}", idx, block, inputs, method, targets, keep)
            layers += done
            rec = BlockRecord(idx, time.perf_counter() - t0, rel, peak_rss_mb(), _peak_device_mb(dev))
            records.append(rec)
            log.info("block %d/%d: %.2fs, rel. error %s, peak RSS %.0f MB", idx + 1, len(blocks), rec.seconds,
                     "n/a" if rel is None else f"{rel:.4f}", rec.peak_rss_mb)
            if callback is not None:
                callback(BlockEvent(idx, len(blocks), rec, inputs.hidden if keep_outputs else None))
    info = info or RunInfo.of(method.name, targets)
    return info.report(layers, records, method.summary(), t_start)
