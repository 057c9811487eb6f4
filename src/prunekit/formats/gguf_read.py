"""Reading a GGUF file: dequantized once into a safetensors folder under the prunekit cache, then read
as a plain folder.

GGUF files are dequantized by transformers, which takes a while; the converted model is cached as
safetensors under :func:`~prunekit.formats.sources.cache_root` and reused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..models.blocks import find_blocks
from ..models.runtime import clear_quantizer
from .lazy import GGUFSource, LazyModel
from .shards import ShardWriter
from .sources import ModelSource, cache_root

log = logging.getLogger(__name__)


def gguf_cache_dir(src: ModelSource) -> Path:
    f = Path(src.path) / src.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{f.stem}-{key}"


def convert_gguf(src: ModelSource, dest: Path) -> None:
    """Dequantize a GGUF file once into a safetensors folder (atomically), one block at a time.

    The tensors are those ``from_pretrained(gguf_file=...)`` produces (transformers' own name mapping
    and dequantization), but only one block is in memory at a time: loading a 1.5B GGUF this way
    peaks at about its float32 embedding plus one block, not at several copies of the model.
    """
    from transformers import AutoTokenizer

    log.info("converting %s to safetensors (once; cached in %s)", src.gguf_file, dest)
    lazy = LazyModel(GGUFSource(Path(src.path) / src.gguf_file), torch.float32)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    path, blocks = find_blocks(lazy.model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        writer = ShardWriter(tmp, path)
        for i, block in enumerate(blocks):
            lazy.load(f"{path}.{i}")
            writer.write_block(i, block)
            lazy.release(f"{path}.{i}")
        lazy.write_outside(writer, path)
        clear_quantizer(lazy.model)
        writer.finish(lazy.model)
        tok.save_pretrained(tmp)
        if dest.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def materialized(src: ModelSource) -> ModelSource:
    """A GGUF source as its converted safetensors folder (converted once, then read from the cache)."""
    if not src.gguf_file:
        return src
    cached = gguf_cache_dir(src)
    if not (cached / "config.json").is_file():
        convert_gguf(src, cached)
    return ModelSource(str(cached))

