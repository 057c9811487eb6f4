"""Compress and evaluate models bigger than memory, one decoder block at a time.

:func:`open_lazy` builds a :class:`~prunekit.formats.lazy.LazyModel` (a skeleton whose weights stay
in the checkpoint); :func:`prune_streamed` runs the same engine as :func:`prunekit.prune` —
same statistics, same compression, bit-identical weights — but reads each block from the
checkpoint when its turn comes and writes it to the output shards as soon as it is compressed.
Allocators that need whole-model statistics read them in a pre-pass (AlphaPruning: each weight
read from the checkpoint in turn; OWL: its dense forward reads every block as it runs).
:func:`fits_in_memory` decides whether streaming is needed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .calibration import BlockEvent, run_sequential
from .calibration.residency import Streamed
from .config import PruneConfig
from .errors import ConfigError
from .formats.compressed_read import CompressedSource, is_compressed_folder
from .formats.compressed_write import CompressedWriter
from .formats.lazy import GGUFSource, LazyModel, SafetensorsSource, safetensors_header
from .formats.lowrank import is_lowrank_folder, read_manifest
from .formats.shards import ShardWriter
from .formats.sources import resolve_source
from .families import Family, FamilyConfig, prepare
from .models import find_blocks, resolve_dtype
from .report import Report

log = logging.getLogger(__name__)


def _source(spec: str):
    src = resolve_source(spec)
    if src.hub:
        raise ConfigError(f"model {spec!r} is a hub id: streaming reads a local checkpoint; download it first "
                          "(huggingface-cli download) and pass the folder")
    if src.gguf_file:
        return GGUFSource(Path(src.path) / src.gguf_file), None
    folder = Path(src.path)
    if is_compressed_folder(folder):  # prunekit's sparse format: each tensor decoded when it is read
        source = CompressedSource(folder)
        return source, source.reader.lowrank or None
    manifest = read_manifest(folder)["modules"] if is_lowrank_folder(folder) else None
    return SafetensorsSource(folder), manifest


def open_lazy(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """``(LazyModel, tokenizer)`` for a local folder, ``.gguf`` file or alias; no weight is read yet."""
    from transformers import AutoTokenizer

    source, lowrank = _source(spec)
    src = resolve_source(spec)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file) if src.gguf_file else \
        AutoTokenizer.from_pretrained(src.path)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return LazyModel(source, resolve_dtype(dtype), device, lowrank), tok


def available_memory() -> int:
    """Bytes this process could get now: the system's ``MemAvailable``, or less when the process's
    cgroup (a container's memory limit) allows less."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    room = _cgroup_room()
    return min(avail, room) if room is not None else avail


def _cgroup_room() -> int | None:
    """The memory limit minus the usage of this process's cgroup (v1 or v2), if it has a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":  # cgroup v1
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit, usage = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        elif controllers == "":  # cgroup v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, usage = base / "memory.max", base / "memory.current"
        else:
            continue
        try:
            text = limit.read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                continue
            return int(text) - int(usage.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def model_bytes_on_disk(spec: str, dtype: str | torch.dtype) -> int | None:
    """The model's size in ``dtype`` from the checkpoint's headers (no weights read); ``None`` for hub ids."""
    src = resolve_source(spec)
    if src.hub:
        return None
    size = torch.tensor([], dtype=resolve_dtype(dtype)).element_size()
    if src.gguf_file:
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(str(Path(src.path) / src.gguf_file)).tensors) * size
    if is_compressed_folder(src.path):  # the stored parts are smaller than the tensors they decode to
        reader = CompressedSource(src.path).reader
        return sum(reader.numel(n) for n in reader.tensors) * size
    total = 0
    for f in Path(src.path).glob("*.safetensors"):
        for spec in safetensors_header(f)[0].values():
            n = 1
            for d in spec["shape"]:
                n *= d
            total += n
    return total * size


def fits_in_memory(spec: str, dtype: str | torch.dtype, share: float = 0.5) -> bool:
    """Whether the whole model (in ``dtype``) takes at most ``share`` of the available memory; a GGUF
    file is first dequantized to float32, so that is what must fit there."""
    src = resolve_source(spec)
    need = model_bytes_on_disk(spec, "float32" if src.gguf_file else dtype)
    return need is None or need <= share * available_memory()


def prune_streamed(
    lazy: LazyModel,
    config: PruneConfig | FamilyConfig | Family,
    out_folder: str | Path,
    tokenizer=None,
    calib: Tensor | None = None,
    callback: Callable[[BlockEvent], None] | None = None,
    data_dir=None,
    save_format: str = "dense",
) -> Report:
    """:func:`prunekit.prune` for a :class:`LazyModel`: the compressed model is written to ``out_folder``
    (shards + index + config; the caller adds tokenizer and report) block by block, as a plain
    sharded HF folder (``save_format="dense"``) or in prunekit's compressed format (``"compressed"``).

    ``config``: a flat or family config, or a handler from :func:`prunekit.families.prepare` (its
    components are used as built). Families that reshape the model as a whole cannot stream."""
    if save_format not in ("dense", "compressed"):
        raise ConfigError(f"save format {save_format!r} is not one of: dense, compressed")
    t0 = time.perf_counter()
    job = prepare(config)
    if not job.streams:
        raise ConfigError(f"pattern {job.config.front()['pattern']!r} reshapes the model as a whole and cannot stream: "
                          "load the model in memory (prunekit.load_model + prunekit.prune), or use an unstructured / "
                          "N:M pattern")
    model = lazy.model
    path, blocks = find_blocks(model)
    linears = job.select(model)
    residency = Streamed(lazy, path, None, spill_dir=out_folder)  # reads (and checks) everything outside the blocks
    calib, calib_info = job.calibration(model, calib, tokenizer, data_dir)
    with lazy.autoload(path):  # OWL's dense forward reads each block as it runs
        targets, alloc_summary = job.targets(model, linears, calib, residency.linears(linears))
    writer = (CompressedWriter if save_format == "compressed" else ShardWriter)(out_folder, path)
    residency.on_done = writer.write_block
    info = job.run_info(calib_info, {"allocation": alloc_summary, "streamed": True}, t0)
    report = run_sequential(model, calib if job.method.needs_calibration else None, job.method, targets,
                            job.config.calib.batch_size, None, callback, info=info, residency=residency)
    lazy.write_outside(writer, path)
    writer.finish(model)
    log.info("pruned (streamed) to %.4f sparsity in %.1fs", report.sparsity, report.seconds)
    return report


__all__ = ["available_memory", "fits_in_memory", "model_bytes_on_disk", "open_lazy", "prune_streamed"]
