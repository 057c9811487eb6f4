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

from torch import nn

log = logging.getLogger(__name__)


class ShardWriter:
    """Shards of one model, written block by block into ``folder`` (see module docstring)."""

    def __init__(self, folder: str | Path, blocks_path: str, n_blocks: int) -> None:
        self.folder, self.path, self.n_blocks = Path(folder), blocks_path, n_blocks
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.lowrank: dict[str, dict] = {}
        self.shards: list[str] = []

    def _shard_name(self, k: int) -> str:
        return f"shard-{k + 1:05d}-of-{self.n_blocks + 1:05d}.safetensors"

    def _write(self, k: int, tensors: dict) -> None:
        from safetensors.torch import save_file

        name = self._shard_name(k)
        save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(self.folder / name), metadata={"format": "pt"})
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total += t.numel() * t.element_size()
        self.shards.append(name)

    def write_block(self, index: int, block: nn.Module) -> None:
        """Write block ``index`` (its parameters and persistent buffers) as one shard."""
        from .lowrank import LowRankLinear

        prefix = f"{self.path}.{index}."
        self._write(index, {prefix + n: t for n, t in block.state_dict().items()})
        for n, m in block.named_modules():
            if isinstance(m, LowRankLinear):
                self.lowrank[prefix + n] = {"rank": m.rank, "in_features": m.in_features,
                                            "out_features": m.out_features, "bias": m.up.bias is not None}

    def finish(self, model: nn.Module) -> None:
        """Write everything outside the blocks (tied tensors once), rename the shards, write the index and config."""
        from .lowrank import FORMAT, MANIFEST

        seen, rest = set(), {}
        for n, t in model.state_dict().items():
            if n.startswith(self.path + ".") or t.device.type == "meta":
                continue
            key = (t.data_ptr(), tuple(t.shape))
            if key in seen:  # a tied weight (the LM head sharing the embeddings) is stored once
                continue
            seen.add(key)
            rest[n] = t
        self._write(self.n_blocks, rest)
        stem = "prunekit_lowrank" if self.lowrank else "model"
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
            (self.folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": 1, "modules": self.lowrank,
                                                            "sharded": True}, indent=2))
        log.info("wrote %d shards (%.0f MB) to %s", len(self.shards), self.total / 2**20, self.folder)
