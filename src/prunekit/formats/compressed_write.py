"""Writing prunekit compressed folders: checkpoints as small as the sparsity.

Every decoder linear's weight is stored in the smallest exact encoding :func:`prunekit.formats.codec.encode`
finds (dense, a bitmask of the non-zeros plus their values, or N:M kept values plus packed
in-group indices); every other tensor (embeddings, norms, LM head, low-rank factors' biases) is
stored as is, tied tensors once. One safetensors shard per decoder block plus one for the rest,
indexed by a JSON manifest, so a reader can decode one block without touching the others; the
layout is documented in :mod:`prunekit.formats.compressed_read`, which reads it back
(``prunekit.load_model(folder)``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..models.blocks import UnsupportedModelError, block_linears, find_blocks
from ..models.lowrank import LowRankLinear
from ..models.runtime import clear_quantizer
from . import checksum, codec
from .atomic import atomic_folder
from .compressed_read import FORMAT, MANIFEST, REST_FILE, VERSION, block_file, part_key
from .sizes import dense_weights_bytes, write_report

log = logging.getLogger(__name__)


def unique_state(model: nn.Module, skip: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with every shared tensor once, and ``{alias: name}`` for the tied ones.

    Names starting with ``skip`` and tensors still on the ``meta`` device (released blocks of a
    streamed model) are left out.
    """
    first: dict[tuple, str] = {}
    state, tied = {}, {}
    for name, t in model.state_dict().items():
        if (skip and name.startswith(skip)) or t.device.type == "meta":
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if t.data_ptr() and key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        state[name] = t.detach()
    return state, tied


def encode_tensor(t: Tensor, transposed: bool | None) -> tuple[codec.Encoded, dict[str, Any]]:
    """Encode one tensor; returns the encoding and its manifest entry (without ``file``/``block``).

    ``transposed``: ``None`` stores ``t`` dense; ``False``/``True`` allow a sparse encoding of ``t``
    or of its transpose (GPT-2's ``Conv1D`` keeps ``[in, out]``; N:M groups run along the inputs).
    """
    enc = codec.encode(t.t() if transposed else t, sparse_ok=transposed is not None)
    if enc.encoding == "dense" and transposed:  # dense tensors are stored in the module's own layout
        enc = codec.Encoded("dense", {"data": t.detach().cpu().contiguous()})
    entry: dict[str, Any] = {"encoding": enc.encoding, "shape": list(t.shape),
                             "dtype": str(t.dtype).removeprefix("torch."), "bytes": enc.nbytes}
    if enc.encoding != "dense":
        entry.update(transposed=bool(transposed), signs="signs" in enc.parts, **enc.meta)
    return enc, entry


class CompressedWriter:
    """Writes a compressed folder block by block: :meth:`write_block` for each decoder block (its
    shard is written at once, so a streamed pipeline can release the block), then :meth:`finish`
    for everything outside the blocks, the manifest and the config.

    The same interface as :class:`prunekit.formats.shards.ShardWriter` (the dense streamed writer).
    """

    def __init__(self, folder: str | Path, blocks_path: str | None, n_blocks: int | None = None) -> None:
        self.folder, self.path, self.n_blocks = Path(folder), blocks_path, n_blocks
        self.tensors: dict[str, dict] = {}
        self.lowrank: dict[str, dict] = {}
        self.dense_bytes = 0
        self.blocks_written: set[int] = set()
        self.rest_files = 0
        self.sums: dict[str, str] = {}  # CRC-32 of every stored part (prunekit.formats.checksum)

    def _write(self, block: int | None, tensors: dict[str, Tensor], candidates: dict[str, bool],
               file: str | None = None) -> None:
        from safetensors.torch import save_file

        file = file or block_file(block)
        parts: dict[str, Tensor] = {}
        for name, t in tensors.items():
            enc, entry = encode_tensor(t, candidates.get(name))
            parts.update({part_key(name, p): v for p, v in enc.parts.items()})
            self.tensors[name] = {"file": file, "block": block, **entry}
            self.dense_bytes += t.numel() * t.element_size()
        self.sums.update(checksum.checksums(parts))
        save_file(parts, str(self.folder / file), metadata={"format": "pt", "prunekit": FORMAT})

    def write_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Write tensors from outside the blocks (stored as they are) as one more shard, now."""
        self.rest_files += 1
        file = REST_FILE if self.rest_files == 1 else REST_FILE.replace(".safetensors", f"-{self.rest_files}.safetensors")
        self._write(None, tensors, {}, file)

    def write_block(self, index: int, block: nn.Module) -> None:
        """Encode decoder block ``index`` (parameters and persistent buffers) into its own shard."""
        prefix = f"{self.path}.{index}"
        self.blocks_written.add(index)
        linears = block_linears(block, prefix)
        candidates = {f"{n}.weight": not isinstance(m, nn.Linear) for n, m in linears.items()}
        self._write(index, {f"{prefix}.{n}": t.detach() for n, t in block.state_dict().items()}, candidates)
        for n, m in block.named_modules():
            if isinstance(m, LowRankLinear):
                self.lowrank[f"{prefix}.{n}"] = {"rank": m.rank, "in_features": m.in_features,
                                                 "out_features": m.out_features, "bias": m.up.bias is not None}

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Write the tensors outside the blocks (tied ones once), the manifest and the config; returns the manifest."""
        rest, tied = unique_state(model, f"{self.path}." if self.path else None)
        rest = {n: t for n, t in rest.items() if n not in self.tensors}  # not already given to write_tensors
        tied = {a: n for a, n in tied.items() if a not in self.tensors}
        if rest:
            self.write_tensors(rest)
        count = self.n_blocks if self.n_blocks is not None else max(self.blocks_written, default=-1) + 1
        encodings = {k: sum(e["encoding"] == k for e in self.tensors.values()) for k in codec.ENCODINGS}
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": str(model.dtype).removeprefix("torch."),
            "blocks": {"path": self.path, "count": count}, "tensors": self.tensors, "tied": tied,
            "lowrank": self.lowrank,
            "sizes": {"stored_bytes": sum(e["bytes"] for e in self.tensors.values()), "dense_bytes": self.dense_bytes,
                      "encodings": encodings},
        }
        manifest = checksum.seal(manifest, self.sums)
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        model.config.save_pretrained(self.folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self.folder)
        log.info("compressed %d tensors (%s) into %.1f MB (dense %.1f MB)", len(self.tensors), encodings,
                 manifest["sizes"]["stored_bytes"] / 2**20, self.dense_bytes / 2**20)
        return manifest


def write_model(model: nn.Module, folder: Path) -> dict[str, Any]:
    """Encode and write a whole in-memory model into ``folder``, one block at a time; returns the manifest."""
    try:
        path, blocks = find_blocks(model)
    except UnsupportedModelError:  # no decoder blocks found: one shard, every tensor dense
        path, blocks = None, []
    writer = CompressedWriter(folder, path, len(blocks))
    for i, block in enumerate(blocks):
        writer.write_block(i, block)
    return writer.finish(model)


def save_compressed_folder(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                           overwrite: bool = False) -> Path:
    """Save ``model`` in the compressed format, atomically; reload with ``prunekit.load_model(out_dir)``.

    Folder: ``config.json``, ``generation_config.json``, tokenizer files, ``prunekit_compressed.json``
    (manifest), ``prunekit-compressed-rest.safetensors`` and one
    ``prunekit-compressed-block-NNNNN.safetensors`` per decoder block, and the report (with the
    measured sizes under ``"storage"``) when one is given.
    """
    clear_quantizer(model)
    dense = dense_weights_bytes(model)

    def write(tmp: Path) -> None:
        write_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report, dense, "compressed")

    return atomic_folder(out_dir, write, overwrite, needed_bytes=_estimate_bytes(model))


def _estimate_bytes(model: nn.Module) -> int:
    """About the bytes the folder will take (for the free-space check): non-zeros plus one bit per weight."""
    state, _ = unique_state(model)
    return sum(min(t.numel(), int((t != 0).sum()) + t.numel() // 8) * t.element_size() for t in state.values())
