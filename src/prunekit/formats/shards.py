"""Writing a model one block at a time: the shards of a Hugging Face folder as blocks are compressed.

The block-streamed engine hands every compressed block to :meth:`ShardWriter.write_block`, which
writes it as its own safetensors shard at once (so the block's memory can be released); the
modules outside the blocks go in a last shard, with the index that ``from_pretrained`` reads
(``model.safetensors.index.json``). A model with factorized (low-rank) modules is written in
prunekit's low-rank format instead (``prunekit_lowrank*`` names and a manifest), which plain
transformers refuses rather than silently re-initialising the missing dense weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..models.lowrank import LowRankLinear
from . import checksum
from .lowrank import FORMAT, MANIFEST, STEM

log = logging.getLogger(__name__)


class ShardWriter:
    """Shards of one model, written one group of tensors at a time into ``folder`` (see module docstring)."""

    def __init__(self, folder: str | Path, blocks_path: str) -> None:
        self.folder, self.path = Path(folder), blocks_path
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.lowrank: dict[str, dict] = {}
        self.shards: list[str] = []
        self.sums: dict[str, str] = {}  # CRC-32 per tensor, recorded in a low-rank manifest

    def write_tensors(self, tensors: dict) -> None:
        """Write ``tensors`` (full names → tensors) as one shard, now."""
        name = f"part-{len(self.shards):05d}.safetensors"  # renamed in finish(), when the count is known
        write_safetensors(self.folder / name, tensors, {"format": "pt"})
        self.sums.update(checksum.checksums(tensors))
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total += t.numel() * t.element_size()
        self.shards.append(name)

    def write_block(self, index: int, block: nn.Module) -> None:
        """Write block ``index`` (its parameters and persistent buffers) as one shard."""
        prefix = f"{self.path}.{index}."
        self.write_tensors({prefix + n: t for n, t in block.state_dict().items()})
        for n, m in block.named_modules():
            if isinstance(m, LowRankLinear):
                self.lowrank[prefix + n] = {"rank": m.rank, "in_features": m.in_features,
                                            "out_features": m.out_features, "bias": m.up.bias is not None}

    def finish(self, model: nn.Module) -> None:
        """Name the shards, write the index, the config and (for factorized models) the manifest."""
        stem = STEM if self.lowrank else "model"
        final = {}
        for k, old in enumerate(self.shards):
            new = f"{stem}-{k + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / old).rename(self.folder / new)
            final[old] = new
        index = {"metadata": {"total_size": self.total}, "weight_map": {n: final[s] for n, s in self.weight_map.items()}}
        (self.folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        model.config.save_pretrained(self.folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.folder)
        if self.lowrank:
            info = {"format": FORMAT, "version": 1, "modules": self.lowrank, "sharded": True}
            (self.folder / MANIFEST).write_text(json.dumps(checksum.seal(info, self.sums), indent=2))
        log.info("wrote %d shards (%.0f MB) to %s", len(self.shards), self.total / 2**20, self.folder)


_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory.

    ``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy; for a 0.9 GB
    embedding that copy is the peak of a streamed run. The format is simple enough to write
    directly: an 8-byte little-endian header length, the JSON header (offsets into the data, padded
    to 8 bytes with spaces), then the raw data in header order.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, parts = 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        parts.append(t)
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in parts:
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))


def outside_blocks(model: nn.Module, blocks_path: str) -> dict:
    """The loaded tensors outside the decoder blocks, a tied weight (the LM head sharing the embeddings) once."""
    seen, rest = set(), {}
    for n, t in model.state_dict().items():
        if n.startswith(blocks_path + ".") or t.device.type == "meta":
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        rest[n] = t
    return rest
