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

A method with a block step (block reconstruction, :mod:`prunekit.methods.blockstep`) gets the
compressed block between steps 2 and 3, with the activations it asked for: the dense model's own
stream of hidden states (carried beside the compressed one: a :class:`DenseStream`, one more
forward of the dense block per block) and/or the dense block's outputs on the compressed model's
inputs (kept by step 1, which then runs every batch to the block's end).

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
from ..methods.blockstep import BlockData
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


def collect(index: int, block: nn.Module, inputs: BlockInputs, method: Method, modules: dict[str, nn.Module],
            outputs: list | None = None) -> tuple[dict[str, InputStats | None], Tensor | None]:
    """Step 1: the statistics of ``modules`` on the block's inputs, and the dense output of batch 0.

    With ``outputs`` (a list-like), every batch runs to the block's end and the dense block's
    outputs are appended to it (a block step's local targets).
    """
    if not modules or not method.needs_calibration:
        ref = None
        runs = inputs.batches if outputs is not None else (1 if modules and inputs.batches else 0)
        for b in range(runs):
            out = inputs.call(index, block, b)
            ref = out if b == 0 else ref
            if outputs is not None:
                outputs.append(out)
        return {name: None for name in modules}, ref
    collector = _StatsCollector(method, modules)
    ref = None
    try:
        for b in range(inputs.batches):
            collector.early_exit = b > 0 and outputs is None
            try:
                out = inputs.call(index, block, b)
                if b == 0:
                    ref = out
                if outputs is not None:
                    outputs.append(out)
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


class DenseStream:
    """The dense model's hidden states entering the current block, and (after :meth:`forward`) leaving it.

    Carried beside the compressed model's activations for a block step that trains on, or towards,
    what the dense model computes. ``store()`` makes an empty list-like (in memory, or on disk).
    """

    def __init__(self, hidden, store: Callable[[], list]) -> None:
        self.inputs, self.outputs = store(), store()
        for h in hidden:
            self.inputs.append(h.clone())

    def forward(self, index: int, block: nn.Module, inputs: BlockInputs) -> None:
        """The dense block (not compressed yet) on the dense inputs: the dense model's next activations."""
        for b in range(len(self.inputs)):
            out = inputs.call(index, block, b, self.inputs[b])
            if b < len(self.outputs):
                self.outputs[b] = out
            else:
                self.outputs.append(out)

    def advance(self) -> None:
        """This block's outputs become the next block's inputs (the old inputs' storage is reused)."""
        self.inputs, self.outputs = self.outputs, self.inputs


def _slice_rows(value, rows: slice, n: int):
    """``value`` (a block argument) restricted to the sequences ``rows`` of a batch of ``n``: every tensor
    of two or more dimensions whose first is the batch (masks, position ids, rotary tables); the rest as is."""
    if isinstance(value, Tensor):
        return value[rows] if value.dim() >= 2 and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_rows(v, rows, n) for v in value)
    if isinstance(value, dict):
        return {k: _slice_rows(v, rows, n) for k, v in value.items()}
    return value


def _block_runner(index: int, block: nn.Module, inputs: BlockInputs) -> Callable:
    """``run(b, hidden, rows)`` of :class:`~prunekit.methods.blockstep.BlockData`: ``hidden`` is a whole
    batch (``[n, seqlen, width]``); ``rows`` picks a micro-batch of it, and of the block's other arguments."""

    def run(b: int, hidden: Tensor, rows: slice | None = None) -> Tensor:
        call = inputs.calls[index][b]
        n = hidden.shape[0]
        if rows is None or range(n)[rows] == range(n):
            return call(block, hidden)
        part = type(call)(_slice_rows(call.args, rows, n), _slice_rows(call.kwargs, rows, n), call.hidden_kw)
        return part(block, hidden[rows])

    return run


def _block_step(idx: int, block: nn.Module, modules: dict[str, nn.Module], inputs: BlockInputs, method: Method,
                stream: DenseStream | None, local: list | None) -> dict:
    """The method's block step on the compressed block (before propagation); what it did, with its time."""
    t0 = time.perf_counter()
    data = BlockData(idx, block, modules, _block_runner(idx, block, inputs), inputs.hidden,
                     stream.inputs if stream is not None else None, stream.outputs if stream is not None else None,
                     local)
    info = dict(method.refine_block(data) or {})
    info["seconds"] = time.perf_counter() - t0
    return info


def _one_block(model: nn.Module, prefix: str, idx: int, block: nn.Module, inputs: BlockInputs, method: Method,
               targets: dict[str, Target], keep: bool, stream: DenseStream | None = None,
               store: Callable[[], list] = list) -> tuple[list[LayerRecord], float | None, dict]:
    """The three steps for one block (and the method's block step): its layers' records, its output error
    and what the block step did."""
    modules = {n: m for n, m in block_linears(block, prefix).items() if n in targets}
    needs = method.block_needs() if modules else None
    if stream is not None and needs is not None:
        stream.forward(idx, block, inputs)
    local = store() if needs is not None and needs.local_targets else None
    stats, ref = collect(idx, block, inputs, method, modules, local)
    layers = compress(model, modules, stats, method, targets)
    del stats
    if needs is not None:
        modules = {n: model.get_submodule(n) for n in modules}  # the replacements, where compress made any
    info = _block_step(idx, block, modules, inputs, method, stream, local) if needs is not None else {}
    del local
    return layers, propagate(idx, block, inputs, ref, keep), info


def _store(res: InMemory | Streamed) -> Callable[[], list]:
    """A factory of empty list-likes for extra activations, where the residency keeps its own."""

    def make():
        out = res.activations()
        return [] if out is None else out

    return make


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
    needs = method.block_needs()
    store = _store(res)
    with calibration_forward_context(model):
        inputs = BlockInputs()
        if calibrated:
            with res.capture(model, blocks):
                inputs = capture_block_inputs(model, blocks, calib_ids, batch_size, dev, res.activations())
        stream = DenseStream(inputs.hidden, store) if needs is not None and needs.dense_stream else None
        for idx, block in enumerate(blocks):
            t0 = time.perf_counter()
            with res.block(idx, block):
                keep = calibrated and (idx < len(blocks) - 1 or keep_outputs)
                done, rel, step = _one_block(model, f"{path}.{idx}", idx, block, inputs, method, targets, keep,
                                             stream, store)
                if stream is not None and idx < len(blocks) - 1:
                    if not any(n in targets for n in block_linears(block, f"{path}.{idx}")):
                        stream.forward(idx, block, inputs)  # a block outside the selection: still the dense model's
                    stream.advance()
            layers += done
            rec = BlockRecord(idx, time.perf_counter() - t0, rel, peak_rss_mb(), _peak_device_mb(dev), step)
            records.append(rec)
            log.info("block %d/%d: %.2fs, rel. error %s, peak RSS %.0f MB", idx + 1, len(blocks), rec.seconds,
                     "n/a" if rel is None else f"{rel:.4f}", rec.peak_rss_mb)
            if callback is not None:
                callback(BlockEvent(idx, len(blocks), rec, inputs.hidden if keep_outputs else None))
    info = info or RunInfo.of(method.name, targets)
    return info.report(layers, records, method.summary(), t_start)
