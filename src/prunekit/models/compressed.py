"""Reading prunekit compressed folders: lazily, one decoder block's tensors at a time.

A compressed folder (written by :func:`prunekit.export.compressed.save_compressed_folder`) holds
``config.json``, ``generation_config.json``, the tokenizer, the manifest :data:`MANIFEST` and one
safetensors shard per decoder block (:func:`block_file`) plus one for everything outside the
blocks (:data:`REST_FILE`: embeddings, final norm, LM head). It has no ``model.safetensors``, so
plain ``transformers`` refuses it loudly instead of initialising random weights.

Manifest (JSON)::

    {"format": "prunekit-compressed", "version": 1, "dtype": "bfloat16",
     "blocks": {"path": "model.layers", "count": 30},
     "tensors": {NAME: {"file": SHARD, "block": INT | null, "encoding": "dense" | "bitmask" | "nm",
                        "shape": [...], "dtype": "bfloat16", "bytes": STORED_BYTES,
                        "transposed": BOOL, "signs": BOOL, "nnz": INT, "n": N, "m": M, "index_bits": B}},
     "tied": {ALIAS: NAME}, "lowrank": {MODULE: {"rank", "in_features", "out_features", "bias"}},
     "sizes": {"stored_bytes": ..., "dense_bytes": ...}}

Inside a shard a ``dense`` tensor is stored under ``NAME``; an encoded one as ``NAME:values``,
``NAME:mask`` (bitmask) or ``NAME:indices`` (nm) and ``NAME:signs`` when ``signs`` is true (byte
layouts: :mod:`prunekit.codec`). ``transposed`` marks GPT-2 ``Conv1D`` weights (stored ``[in,
out]``), which are encoded as their ``[out, in]`` view so N:M groups run along the inputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import codec
from ..errors import ConfigError
from .blocks import set_module
from .lowrank import LowRankLinear

log = logging.getLogger(__name__)

MANIFEST = "prunekit_compressed.json"
FORMAT = "prunekit-compressed"
VERSION = 1
REST_FILE = "prunekit-compressed-rest.safetensors"
_PARTS = {"dense": (), "bitmask": ("values", "mask"), "nm": ("values", "indices")}
_FIX = "re-save it (prunekit prune ... --save-format compressed, or prunekit export)"


class CorruptCheckpointError(ConfigError):
    """A compressed folder whose files do not match its manifest."""


def block_file(index: int) -> str:
    return f"prunekit-compressed-block-{index:05d}.safetensors"


def part_key(name: str, part: str) -> str:
    """The safetensors key of one part of tensor ``name`` (``data`` is the tensor itself)."""
    return name if part == "data" else f"{name}:{part}"


def is_compressed_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dt


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of a compressed folder."""
    f = Path(path) / MANIFEST
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{f}: unreadable manifest ({e}); {_FIX}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tensors"), dict):
        raise CorruptCheckpointError(f"{f} is not a {FORMAT} manifest; was the folder written by another tool?")
    if int(data.get("version", 0)) > VERSION:
        raise ConfigError(f"{f} is format version {data['version']}, this prunekit reads up to {VERSION}; "
                          "upgrade prunekit")
    for name, e in data["tensors"].items():
        if not isinstance(e, dict) or e.get("encoding") not in _PARTS or not isinstance(e.get("shape"), list) \
                or not isinstance(e.get("file"), str) or "/" in e["file"]:
            raise CorruptCheckpointError(f"{f}: bad entry for tensor {name!r}; {_FIX}")
    return data


class CompressedReader:
    """Lazy access to a compressed folder; :meth:`read` decodes one block's tensors at a time.

    Only the shard of the block asked for is opened (memory-mapped) and it is closed again
    before :meth:`read` returns, so a caller that assigns each block before reading the next
    never holds more than the model plus one block's encoded and decoded tensors.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.tensors: dict[str, dict] = self.manifest["tensors"]
        for file in sorted({e["file"] for e in self.tensors.values()}):
            if not (self.path / file).is_file():
                raise CorruptCheckpointError(f"{self.path / file} is missing (named in {MANIFEST}); the folder is "
                                             f"incomplete: {_FIX}")

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.manifest.get("dtype", "float32"))

    @property
    def num_blocks(self) -> int:
        return int(self.manifest.get("blocks", {}).get("count", 0))

    @property
    def tied(self) -> dict[str, str]:
        return dict(self.manifest.get("tied", {}))

    @property
    def lowrank(self) -> dict[str, dict]:
        return dict(self.manifest.get("lowrank", {}))

    def groups(self) -> list[int | None]:
        """``None`` (everything outside the blocks) first, then every block index."""
        return [None, *range(self.num_blocks)]

    def names(self, block: int | None) -> list[str]:
        return [n for n, e in self.tensors.items() if e.get("block") == block]

    def read(self, block: int | None) -> dict[str, Tensor]:
        """Decode the tensors of decoder block ``block`` (``None``: those outside the blocks)."""
        by_file: dict[str, list[str]] = {}
        for n in self.names(block):
            by_file.setdefault(self.tensors[n]["file"], []).append(n)
        out: dict[str, Tensor] = {}
        for file, names in by_file.items():
            out.update(self._read_file(file, names))
        return out

    def _read_file(self, file: str, names: list[str]) -> dict[str, Tensor]:
        from safetensors import safe_open

        f = self.path / file
        try:
            handle = safe_open(str(f), framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for truncated files
            raise CorruptCheckpointError(f"{f}: cannot be read ({e}); the file is truncated or damaged: "
                                         f"{_FIX}") from None
        out = {}
        with handle:
            keys = set(handle.keys())
            for name in names:
                entry = self.tensors[name]
                wanted = (["data"] if entry["encoding"] == "dense" else list(_PARTS[entry["encoding"]])) \
                    + (["signs"] if entry.get("signs") else [])
                missing = [part_key(name, p) for p in wanted if part_key(name, p) not in keys]
                if missing:
                    raise CorruptCheckpointError(f"{f} lacks {missing[0]!r}, which {MANIFEST} names; {_FIX}")
                try:
                    parts = {p: handle.get_tensor(part_key(name, p)) for p in wanted}
                except Exception as e:  # noqa: BLE001
                    raise CorruptCheckpointError(f"{f}: cannot read {name!r} ({e}); {_FIX}") from None
                out[name] = self._decode(f, name, entry, parts)
        return out

    @staticmethod
    def _decode(f: Path, name: str, entry: dict, parts: dict[str, Tensor]) -> Tensor:
        shape = [int(s) for s in entry["shape"]]
        try:
            dtype = dtype_from_name(entry["dtype"])
            # Conv1D: encoded as the [out, in] view of its [in, out] weight
            if entry.get("transposed") and entry["encoding"] != "dense":
                return codec.decode(entry["encoding"], parts, (shape[1], shape[0]), dtype, entry).t().contiguous()
            return codec.decode(entry["encoding"], parts, tuple(shape), dtype, entry)
        except (codec.CodecError, ValueError, KeyError, IndexError) as e:
            raise CorruptCheckpointError(f"{f}: tensor {name!r} does not match its manifest entry ({e}); "
                                         f"{_FIX}") from None


def _assign(model: nn.Module, name: str, tensor: Tensor, where: Path) -> None:
    """Put ``tensor`` in place of the (meta) parameter or buffer ``name``, in the model's dtype."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    old = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
    if old is None:
        raise CorruptCheckpointError(f"{where}: {name!r} is not a tensor of this model; {_FIX}")
    if tuple(old.shape) != tuple(tensor.shape):
        raise CorruptCheckpointError(f"{where}: {name!r} is {tuple(tensor.shape)} but the model (config.json) needs "
                                     f"{tuple(old.shape)}; {_FIX}")
    if tensor.is_floating_point() and old.is_floating_point() and tensor.dtype != old.dtype:
        tensor = tensor.to(old.dtype)  # like from_pretrained(dtype=...): exact when the dtype is the saved one
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = tensor


def _skeleton(path: Path, reader: CompressedReader, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The architecture of ``config.json`` with every parameter on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        for name, spec in reader.lowrank.items():
            set_module(model, name, LowRankLinear(int(spec["in_features"]), int(spec["out_features"]),
                                                  int(spec["rank"]), bool(spec.get("bias", False)), dtype=dtype))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def load_compressed_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model saved in the compressed format, block by block, with its exact weights.

    The model is built on the meta device, then the tensors outside the blocks and each block's
    tensors are decoded and assigned in turn; a reload never holds two copies of the weights.
    Tensors saved in ``dtype`` come back bit for bit; another ``dtype`` casts them, as
    ``from_pretrained(dtype=...)`` does.
    """
    path = Path(path)
    reader = CompressedReader(path)
    model = _skeleton(path, reader, dtype, trust_remote_code)
    expected = set(model.state_dict())
    stored = set(reader.tensors) | set(reader.tied)
    if stored != expected:
        missing, extra = sorted(expected - stored), sorted(stored - expected)
        raise CorruptCheckpointError(f"{path / MANIFEST} does not match config.json's architecture (missing "
                                     f"{missing[:3]}, unexpected {extra[:3]}); {_FIX}")
    for block in reader.groups():
        for name, tensor in reader.read(block).items():
            _assign(model, name, tensor, path / reader.tensors[name]["file"])
    for alias, source in reader.tied.items():  # tied weights: the very same Parameter, as in the saved model
        src = model.get_parameter(source)
        mod_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(mod_name) if mod_name else model, attr, src)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CorruptCheckpointError(f"{path}: no data for {left[:3]}; {_FIX}")
    log.info("loaded compressed folder %s (%d blocks, %d tensors)", path, reader.num_blocks, len(reader.tensors))
    return model.eval()
