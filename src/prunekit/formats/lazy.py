"""Models that never sit in memory whole: a skeleton plus weights read one block at a time.

A :class:`LazyModel` is the model's module tree with every parameter on the ``meta`` device (no
memory; buffers such as rotary tables are real, they are computed, not loaded) and a
:class:`TensorSource` that reads one tensor at a time from the checkpoint: safetensors shards by
tensor (memory-mapped, so only the tensors asked for are read), or a GGUF file tensor by tensor,
dequantized on the fly with transformers' own name mapping and tensor fix-ups. The streamed engine
materializes the modules outside the decoder blocks, then block 0, block 1, … and releases each
block when it is done — the weights of one block are in memory at a time.

The tensors are exactly those ``from_pretrained`` would load (same files, same dequantization,
same dtype cast), so a streamed run gives the same weights as an in-memory one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.blocks import set_module
from ..models.checks import all_finite, count_nonfinite
from ..models.lowrank import LowRankLinear
from . import checksum
from .lowrank import MANIFEST, SHARD_INDEX, is_lowrank_folder, read_manifest
from .shards import outside_blocks

log = logging.getLogger(__name__)


class TensorSource(ABC):
    """Reads a checkpoint's tensors one at a time, by the model's own state-dict names."""

    config = None  # the transformers config of the checkpoint

    @abstractmethod
    def names(self) -> list[str]:
        """Every tensor name the checkpoint holds (in the model's naming)."""

    @abstractmethod
    def get(self, name: str) -> Tensor:
        """The tensor ``name`` as stored (or dequantized to float32 for GGUF)."""

    def nbytes(self, dtype: torch.dtype) -> int:
        """Size of the whole model in ``dtype`` (for deciding whether it fits in memory)."""
        size = torch.tensor([], dtype=dtype).element_size()
        return sum(self.numel(n) for n in self.names()) * size

    @abstractmethod
    def numel(self, name: str) -> int:
        ...


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_header(path: Path) -> tuple[dict, int]:
    """``(tensor name → {dtype, shape, data_offsets}, data start)`` from a safetensors file's header."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is damaged (unreadable header: {e}); re-download the model or save it again") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsSource(TensorSource):
    """A Hugging Face folder of safetensors (one file or shards with an index).

    Tensors are read with ``pread`` from the offsets in each file's header, not through a memory
    map: a map keeps every page it touched resident in this process, so streaming a 7 GB
    checkpoint through it would show 7 GB of RSS; a read leaves only the tensor asked for.
    """

    def __init__(self, folder: str | Path, config=None) -> None:
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.config = config or AutoConfig.from_pretrained(self.folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = [p.name for p in sorted(self.folder.glob("*.safetensors"))]
            lowrank_index = self.folder / SHARD_INDEX
            if lowrank_index.is_file():
                files = sorted(set(json.loads(lowrank_index.read_text())["weight_map"].values()))
        self._sums = self._checksums()
        if not files:
            raise ConfigError(f"{self.folder} has no safetensors weights to stream from")
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            header, base = safetensors_header(self.folder / f)
            for k, spec in header.items():
                self._where[k] = (self.folder / f, base, spec)

    def _checksums(self) -> dict[str, str] | None:
        """A prunekit low-rank folder's recorded checksums (checked per tensor in :meth:`get`); else None."""
        if not is_lowrank_folder(self.folder):
            return None
        return checksum.verify_manifest(read_manifest(self.folder), self.folder / MANIFEST)

    def names(self) -> list[str]:
        return list(self._where)

    def numel(self, name: str) -> int:
        n = 1
        for d in self._where[name][2]["shape"]:
            n *= d
        return n

    def get(self, name: str) -> Tensor:
        import os

        path, base, spec = self._where[name]
        start, end = spec["data_offsets"]
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = bytearray(end - start)
            view, got = memoryview(buf), 0
            while got < len(buf):
                k = os.preadv(fd, [view[got:]], base + start + got)
                if k <= 0:
                    raise ConfigError(f"{path} ends before tensor {name}: the file is truncated; save it again")
                got += k
        finally:
            os.close(fd)
        if self._sums is not None:
            checksum.check_tensor(self._sums, name, buf, path)
        dtype = ST_DTYPES[spec["dtype"]]
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape(spec["shape"])


class GGUFSource(TensorSource):
    """A GGUF file read tensor by tensor (memory-mapped; each tensor dequantized when asked for)."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGUFReader
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        self.path = Path(path)
        self.config = AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)
        self._reader = GGUFReader(str(self.path))
        arch = read_field(self._reader, "general.architecture")[0]
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config.to_dict())
        mapping = get_gguf_hf_weights_map(skeleton(self.config, torch.float32), self._processor)
        self._tensors = {mapping[t.name]: t for t in self._reader.tensors if t.name in mapping}
        self._mapping = mapping
        self._reader.fields.clear()  # the metadata (a 150k-token vocabulary: ~300 MB of small arrays) is read
        _trim()

    def names(self) -> list[str]:
        return list(self._tensors)

    def numel(self, name: str) -> int:
        return int(self._tensors[name].n_elements)

    def get(self, name: str) -> Tensor:
        import mmap

        import numpy as np
        from gguf.quants import dequantize

        t = self._tensors[name]
        data = t.data
        first = dequantize(data[:1], t.tensor_type)  # one row: the output's row shape and dtype
        out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
        step = max(1, (1 << 24) // max(1, first.nbytes))  # ~16 MB of output per call: bounded temporaries
        for i in range(0, data.shape[0], step):
            out[i: i + step] = dequantize(data[i: i + step], t.tensor_type)
        res = self._processor.process(weights=out, name=t.name, tensor_key_mapping=self._mapping,
                                      parsed_parameters={"tensors": {}})
        w = res.weights
        out = torch.from_numpy(w if w.flags.writeable and w.flags.owndata else np.array(w))
        raw = getattr(self._reader.data, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):  # drop the pages just read from this process's RSS
            raw.madvise(mmap.MADV_DONTNEED)
        return out


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model's module tree with parameters on ``meta`` (computed buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class LazyModel:
    """A skeleton and its tensor source; :meth:`load` fills a sub-tree, :meth:`release` empties it."""

    def __init__(self, source: TensorSource, dtype: torch.dtype, device: torch.device | str = "cpu",
                 lowrank: dict | None = None) -> None:
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        self.model = skeleton(source.config, dtype)
        for name, spec in (lowrank or {}).items():  # factorized modules of a prunekit low-rank folder
            set_module(self.model, name, LowRankLinear(int(spec["in_features"]), int(spec["out_features"]),
                                                       int(spec["rank"]), bool(spec.get("bias")), dtype, "meta"))
        self.model.tie_weights()  # tied parameters are one object: loaded once, under the checkpoint's name
        self.model.prunekit_lazy = self  # evaluation code sees it and walks the blocks one at a time
        self._names = set(source.names())
        self._alias = _name_aliases(self.model, self._names)

    def checkpoint_name(self, name: str) -> str | None:
        return name if name in self._names else self._alias.get(name)

    def load(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> None:
        """Read every parameter and persistent buffer under ``prefix`` (minus ``exclude`` prefixes)."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        base = f"{prefix}." if prefix else ""
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            full = base + name
            if tensor.device.type != "meta" or any(full.startswith(e) for e in exclude):
                continue
            src = self.checkpoint_name(full)
            if src is None:
                raise ConfigError(f"the checkpoint has no tensor for {full}; stream only checkpoints saved by "
                                  "transformers/prunekit, or load the model in memory (--offload none)")
            value = self.source.get(src).to(self.device, self.dtype)  # sources hand out fresh tensors
            if value.is_floating_point() and not all_finite(value):
                raise ConfigError(f"{full} has {count_nonfinite(value)} NaN/Inf values; the model is "
                                  "corrupt: reload or re-download it")
            _assign(self.model, full, value)
        self.model.tie_weights()

    def output_head(self) -> str | None:
        """The module name of an *untied* output embedding (the LM head), else ``None``.

        Pruning never runs it, so a streamed prune leaves it on disk until it is written out: for
        Qwen2.5-1.5B that is 0.9 GB of float32 not held during the whole run.
        """
        head, emb = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if head is None or (emb is not None and head.weight is emb.weight):
            return None
        return module_name(self.model, head)

    def write_outside(self, writer, blocks_path: str) -> None:
        """Write everything outside the blocks with ``writer`` (a ``ShardWriter``), the untied LM head on
        its own after the rest is released, so the two large embeddings are never in memory together."""
        head = self.output_head()
        self.load(exclude=(blocks_path + ".",) + ((head + ".",) if head else ()))
        writer.write_tensors(outside_blocks(self.model, blocks_path))
        if head:
            self.release("")
            self.load(head)
            writer.write_tensors({f"{head}.{n}": t for n, t in self.model.get_submodule(head).state_dict().items()})
            self.release(head)

    def loaded(self, prefix: str) -> bool:
        module = self.model.get_submodule(prefix)
        return all(p.device.type != "meta" for p in module.parameters())

    @contextlib.contextmanager
    def autoload(self, blocks_path: str) -> Iterator[None]:
        """Any forward of the model reads each block before it runs and releases it after (blocks that
        are already loaded are left alone): slower than a block-major walk, but works for every forward."""
        blocks = self.model.get_submodule(blocks_path)
        loaded_here: set[int] = set()

        def pre(i):
            def hook(_mod, _args):
                if not self.loaded(f"{blocks_path}.{i}"):
                    self.load(f"{blocks_path}.{i}")
                    loaded_here.add(i)
            return hook

        def post(i):
            def hook(_mod, _args, _out):
                if i in loaded_here:
                    self.release(f"{blocks_path}.{i}")
                    loaded_here.discard(i)
            return hook

        handles = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(pre(i)),
                                                            b.register_forward_hook(post(i)))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for i in list(loaded_here):
                self.release(f"{blocks_path}.{i}")

    def release(self, prefix: str) -> None:
        """Back to ``meta``: the sub-tree's parameters (``""``: all) free their memory."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        for mod in module.modules():
            for n, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        self.model.tie_weights()
        _trim()


def module_name(root: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` inside ``root``."""
    return next(n for n, m in root.named_modules() if m is module)


def _trim() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise, and RSS would grow with
    every block read and released)."""
    import ctypes
    import sys

    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _assign(root: nn.Module, name: str, value: Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def _name_aliases(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Model names whose checkpoint tensor carries or lacks the base-model prefix (older checkpoints)."""
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for n in model.state_dict():
        if n in names or not prefix:
            continue
        for cand in (n[len(prefix) + 1:] if n.startswith(prefix + ".") else None, f"{prefix}.{n}"):
            if cand and cand in names:
                out[n] = cand
    return out
