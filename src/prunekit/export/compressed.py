"""Writing prunekit compressed folders: checkpoints as small as the sparsity.

Every decoder linear's weight is stored in the smallest exact encoding :func:`prunekit.codec.encode`
finds (dense, a bitmask of the non-zeros plus their values, or N:M kept values plus packed
in-group indices); every other tensor (embeddings, norms, LM head, low-rank factors' biases) is
stored as is, tied tensors once. One safetensors shard per decoder block plus one for the rest,
indexed by a JSON manifest, so a reader can decode one block without touching the others; the
layout is documented in :mod:`prunekit.models.compressed`, which reads it back
(``prunekit.load_model(folder)``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import codec
from ..models import UnsupportedModelError, clear_quantizer, decoder_linears, find_blocks
from ..models.compressed import FORMAT, MANIFEST, REST_FILE, VERSION, block_file, part_key
from ..models.lowrank import lowrank_modules
from .atomic import atomic_folder
from .save import dense_weights_bytes, write_report

log = logging.getLogger(__name__)


def unique_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The state dict with every shared tensor once, and ``{alias: name}`` for the tied ones."""
    first: dict[tuple, str] = {}
    state, tied = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        if t.data_ptr() and key in first:
            tied[name] = first[key]
            continue
        first[key] = name
        state[name] = t.detach()
    return state, tied


def sparse_candidates(model: nn.Module) -> dict[str, bool]:
    """``{weight name: transposed}`` of the decoder linears (the tensors worth encoding sparsely).

    ``transposed`` is true for GPT-2's ``Conv1D``, whose weight is stored ``[in, out]``.
    """
    try:
        linears = decoder_linears(model)
    except UnsupportedModelError:
        return {}
    return {f"{name}.weight": not isinstance(mod, nn.Linear) for name, mod in linears.items()}


def block_of(name: str, block_path: str | None) -> int | None:
    """The decoder block ``name`` lives in (``None``: outside the blocks)."""
    if block_path and name.startswith(block_path + "."):
        head = name[len(block_path) + 1:].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def encode_tensor(t: Tensor, transposed: bool | None) -> tuple[codec.Encoded, dict[str, Any]]:
    """Encode one tensor; returns the encoding and its manifest entry (without ``file``/``block``)."""
    enc = codec.encode(t.t() if transposed else t, sparse_ok=transposed is not None)
    if enc.encoding == "dense" and transposed:  # dense tensors are stored in the module's own layout
        enc = codec.Encoded("dense", {"data": t.detach().cpu().contiguous()})
    entry: dict[str, Any] = {"encoding": enc.encoding, "shape": list(t.shape),
                             "dtype": str(t.dtype).removeprefix("torch."), "bytes": enc.nbytes}
    if enc.encoding != "dense":
        entry.update(transposed=bool(transposed), signs="signs" in enc.parts, **enc.meta)
    return enc, entry


class ShardWriter:
    """Writes a compressed folder's shards one group (a decoder block, or the rest) at a time.

    :func:`write_shards` feeds it a whole model; a block-streamed pipeline can call
    :meth:`write` as soon as each block is compressed and :meth:`manifest` at the end.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, dict] = {}
        self.dense_bytes = 0

    def write(self, block: int | None, tensors: dict[str, Tensor], candidates: dict[str, bool]) -> None:
        """Encode ``tensors`` (name → tensor) into the shard of ``block`` (``None``: the rest shard).

        ``candidates`` maps the names worth encoding sparsely to ``transposed`` (see
        :func:`sparse_candidates`); every other tensor is stored dense.
        """
        from safetensors.torch import save_file

        file = REST_FILE if block is None else block_file(block)
        parts: dict[str, Tensor] = {}
        for name, t in tensors.items():
            enc, entry = encode_tensor(t, candidates.get(name))
            parts.update({part_key(name, p): v for p, v in enc.parts.items()})
            self.tensors[name] = {"file": file, "block": block, **entry}
            self.dense_bytes += t.numel() * t.element_size()
        save_file(parts, str(self.folder / file), metadata={"format": "pt", "prunekit": FORMAT})

    def manifest(self, dtype: torch.dtype, block_path: str | None, count: int, tied: dict[str, str],
                 lowrank: dict[str, dict]) -> dict[str, Any]:
        """The manifest (see :mod:`prunekit.models.compressed`) of everything written so far."""
        encodings = {k: sum(e["encoding"] == k for e in self.tensors.values()) for k in codec.ENCODINGS}
        return {
            "format": FORMAT, "version": VERSION, "dtype": str(dtype).removeprefix("torch."),
            "blocks": {"path": block_path, "count": count}, "tensors": self.tensors, "tied": tied, "lowrank": lowrank,
            "sizes": {"stored_bytes": sum(e["bytes"] for e in self.tensors.values()), "dense_bytes": self.dense_bytes,
                      "encodings": encodings},
        }


def write_shards(model: nn.Module, folder: Path) -> dict[str, Any]:
    """Encode and write every shard of ``model`` into ``folder``, one block at a time; returns the manifest."""
    state, tied = unique_state(model)
    candidates = sparse_candidates(model)
    try:
        block_path, blocks = find_blocks(model)
        count = len(blocks)
    except UnsupportedModelError:
        block_path, count = None, 0
    groups: dict[int | None, list[str]] = {}
    for name in state:
        groups.setdefault(block_of(name, block_path), []).append(name)
    writer = ShardWriter(folder)
    for block in [None, *range(count)]:
        if groups.get(block):
            writer.write(block, {n: state[n] for n in groups[block]}, candidates)
    lowrank = {n: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
                   "bias": m.up.bias is not None} for n, m in lowrank_modules(model).items()}
    return writer.manifest(model.dtype, block_path, count, tied, lowrank)


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
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        info = write_shards(model, tmp)
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report, dense, "compressed")
        sizes = info["sizes"]
        log.info("compressed %d tensors (%s) into %.1f MB (dense %.1f MB)", len(info["tensors"]),
                 sizes["encodings"], sizes["stored_bytes"] / 2**20, sizes["dense_bytes"] / 2**20)

    return atomic_folder(out_dir, write, overwrite, needed_bytes=_estimate_bytes(model))


def _estimate_bytes(model: nn.Module) -> int:
    """About the bytes the folder will take (for the free-space check): non-zeros plus one bit per weight."""
    state, _ = unique_state(model)
    return sum(min(t.numel(), int((t != 0).sum()) + t.numel() // 8) * t.element_size() for t in state.values())
