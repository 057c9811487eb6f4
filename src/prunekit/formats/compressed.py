"""prunekit's compressed format: every decoder block's non-zeros stored compactly (bitmask or N:M
indices, :mod:`prunekit.formats.codec`), one safetensors shard per block, indexed by a manifest.

The layout and the reader are in :mod:`prunekit.formats.compressed_read`, the writer in
:mod:`prunekit.formats.compressed_write`; this module is the format as :data:`FORMATS` sees it.
Only ``prunekit.load_model`` reads it; ``prunekit export DIR --save-format dense`` converts back.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .base import FORMATS, Format
from .compressed_read import is_compressed_folder, load_compressed_model
from .compressed_write import save_compressed_folder

HOW = ("prunekit compressed format: reload with prunekit.load_model; `prunekit export DIR --save-format "
       "dense` writes a plain transformers folder")


class CompressedFormat(Format):
    """The compressed folder (recognised by its manifest); read back block by block."""

    name = "compressed"
    order = 10

    def detect(self, path: str | os.PathLike) -> bool:
        return is_compressed_folder(path)

    def check(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        """Nothing before loading: the reader checks each shard (header, size, checksums) as it opens it."""

    def save(self, model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
             overwrite: bool = False) -> tuple[Path, str]:
        return save_compressed_folder(model, tokenizer, out_dir, report, overwrite), HOW

    def load(self, path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> nn.Module:
        return load_compressed_model(path, dtype, trust_remote_code)


COMPRESSED = FORMATS.add("compressed", CompressedFormat(),
                         help="prunekit's sparse format: non-zeros + bitmask or N:M indices (prunekit.load_model)")
