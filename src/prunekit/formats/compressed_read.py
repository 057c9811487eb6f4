"""Reading prunekit compressed folders: lazily, one decoder block's tensors at a time.

A compressed folder (written by :func:`prunekit.formats.compressed_write.save_compressed_folder`) holds
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
     "sizes": {"stored_bytes": ..., "dense_bytes": ...},
     "integrity": {"algorithm": "crc32", "tensors": {KEY: CRC}, "manifest": CRC}}

Inside a shard a ``dense`` tensor is stored under ``NAME``; an encoded one as ``NAME:values``,
``NAME:mask`` (bitmask) or ``NAME:indices`` (nm) and ``NAME:signs`` when ``signs`` is true (byte
layouts: :mod:`prunekit.formats.codec`). ``transposed`` marks GPT-2 ``Conv1D`` weights (stored ``[in,
out]``), which are encoded as their ``[out, in]`` view so N:M groups run along the inputs.

``integrity`` (:mod:`prunekit.formats.checksum`) holds the CRC-32 of every stored part, by its
safetensors key, and of the manifest itself; the reader checks each part as it reads it and the
manifest when it opens the folder, so a flipped byte or an edited entry fails in one line naming
the tensor and the file instead of loading wrong weights.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.blocks import set_module
from ..models.lowrank import LowRankLinear
from . import checksum, codec
from .lazy import ST_DTYPES, TensorSource, safetensors_header

log = logging.getLogger(__name__)

MANIFEST = "prunekit_compressed.json"
FORMAT = "prunekit-compressed"
VERSION = 1
REST_FILE = "prunekit-compressed-rest.safetensors"
_PARTS = {"dense": (), "bitmask": ("values", "mask"), "nm": ("values", "indices")}
_FIX = "re-save it (prunekit prune ... --save-format compressed, or prunekit export)"


#: a folder whose files do not match its manifest (or its checksums): one line naming the file and tensor
CorruptCheckpointError = checksum.IntegrityError


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


def stored_dtype(folder: str | Path) -> str:
    """The dtype a folder's weights were saved in (compressed manifest or ``config.json``), else ``float32``."""
    folder = Path(folder).expanduser()
    for name, keys in ((MANIFEST, ("dtype",)), ("config.json", ("dtype", "torch_dtype"))):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            if data.get(key) in ("float32", "bfloat16", "float16"):
                return data[key]
    return "float32"


class CompressedReader:
    """Lazy access to a compressed folder: :meth:`tensor` decodes one tensor, :meth:`read` one block.

    Parts are read with positioned reads at the offsets of each shard's header (not through a
    memory map, which would leave every page it touched resident), so a caller that assigns each
    block before reading the next holds the model plus one block's encoded and decoded tensors.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.tensors: dict[str, dict] = self.manifest["tensors"]
        self.sums = checksum.verify_manifest(self.manifest, self.path / MANIFEST)  # None: saved before checksums
        self._headers: dict[str, tuple[dict, int]] = {}
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

    def numel(self, name: str) -> int:
        return math.prod(int(d) for d in self.tensors[self.tied.get(name, name)]["shape"])

    def read(self, block: int | None) -> dict[str, Tensor]:
        """Decode the tensors of decoder block ``block`` (``None``: those outside the blocks)."""
        return {n: self.tensor(n) for n in self.names(block)}

    def tensor(self, name: str) -> Tensor:
        """Decode the tensor ``name`` (a tied alias gives its source tensor)."""
        name = self.tied.get(name, name)
        entry = self.tensors[name]
        wanted = (["data"] if entry["encoding"] == "dense" else list(_PARTS[entry["encoding"]])) \
            + (["signs"] if entry.get("signs") else [])
        parts = {p: self._part(entry["file"], part_key(name, p)) for p in wanted}
        return self._decode(self.path / entry["file"], name, entry, parts)

    def _header(self, file: str) -> tuple[dict, int]:
        if file not in self._headers:
            f = self.path / file
            try:
                header, base = safetensors_header(f)
                end = max((int(s["data_offsets"][1]) for s in header.values()), default=0)
            except (ConfigError, TypeError, KeyError, IndexError, ValueError, AttributeError):
                raise CorruptCheckpointError(f"{f} has an unreadable safetensors header; the file is damaged: "
                                             f"{_FIX}") from None
            if f.stat().st_size < base + end:
                raise CorruptCheckpointError(f"{f} is truncated ({f.stat().st_size} bytes, its header describes "
                                             f"{base + end}); {_FIX}")
            self._headers[file] = (header, base)
        return self._headers[file]

    def _part(self, file: str, key: str) -> Tensor:
        header, base = self._header(file)
        f = self.path / file
        spec = header.get(key)
        if spec is None:
            raise CorruptCheckpointError(f"{f} lacks {key!r}, which {MANIFEST} names; {_FIX}")
        start, end = (int(x) for x in spec["data_offsets"])
        buf = bytearray(end - start)
        with open(f, "rb", buffering=0) as fh:
            fh.seek(base + start)
            got = fh.readinto(buf) if buf else 0
        dtype = ST_DTYPES.get(spec.get("dtype"))
        if got != len(buf) or dtype is None:
            raise CorruptCheckpointError(f"{f}: cannot read {key!r}; the file is damaged: {_FIX}")
        checksum.check_tensor(self.sums, key, buf, f)
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape([int(d) for d in spec["shape"]])

    @staticmethod
    def _decode(f: Path, name: str, entry: dict, parts: dict[str, Tensor]) -> Tensor:
        shape = [int(s) for s in entry["shape"]]
        try:
            dtype = dtype_from_name(entry["dtype"])
            # Conv1D: encoded as the [out, in] view of its [in, out] weight
            if entry.get("transposed") and entry["encoding"] != "dense":
                return codec.decode(entry["encoding"], parts, (shape[1], shape[0]), dtype, entry).t().contiguous()
            return codec.decode(entry["encoding"], parts, tuple(shape), dtype, entry)
        except (codec.CodecError, ValueError, KeyError, IndexError, RuntimeError) as e:
            raise CorruptCheckpointError(f"{f}: tensor {name!r} does not match its manifest entry ({e}); "
                                         f"{_FIX}") from None


class CompressedSource(TensorSource):
    """A compressed folder as the tensor source of a :class:`~prunekit.formats.lazy.LazyModel`
    (block-streamed compression and evaluation): each tensor is decoded when it is asked for."""

    def __init__(self, folder: str | Path, config=None) -> None:
        from transformers import AutoConfig

        self.reader = CompressedReader(folder)
        self.config = config or AutoConfig.from_pretrained(folder)

    def names(self) -> list[str]:
        return [*self.reader.tensors, *self.reader.tied]

    def numel(self, name: str) -> int:
        return self.reader.numel(name)

    def get(self, name: str) -> Tensor:
        return self.reader.tensor(name)


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
