"""One entry point for saving a compressed model in the format the user chose.

* ``dense`` (default): the plain Hugging Face folder (``model.safetensors``), loadable by
  ``transformers`` anywhere — or prunekit's factorized low-rank folder when the model holds
  low-rank modules (unless ``merge_lowrank``).
* ``compressed``: prunekit's sparse format (:mod:`prunekit.export.compressed`): non-zeros plus a
  bitmask, or N:M values plus packed indices, per decoder block; low-rank modules stay factorized.
  Only ``prunekit.load_model`` reads it; ``prunekit export DIR --save-format dense`` converts back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..models.lowrank import merge_lowrank as _merge
from .compressed import save_compressed_folder
from .lowrank import save_compressed
from .save import dense_weights_bytes, storage

log = logging.getLogger(__name__)

SAVE_FORMATS = ("dense", "compressed")


def save_folder(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                overwrite: bool = False, merge_lowrank: bool = False, save_format: str = "dense") -> tuple[Path, str]:
    """Save atomically in ``save_format``; returns the folder and one sentence: what loads it, how big it is.

    The report (when given) is written into the folder with the measured sizes under
    ``"storage"``: ``folder_bytes`` (every file but the report), ``weights_bytes`` (the
    safetensors files) and ``dense_equivalent_bytes`` (every weight at full size, tied ones once,
    low-rank factors merged).
    """
    if save_format not in SAVE_FORMATS:
        raise ConfigError(f"save format {save_format!r} is not one of: {', '.join(SAVE_FORMATS)}")
    from ..models.lowrank import lowrank_modules
    from .structured import is_restructured

    if save_format == "compressed" and not lowrank_modules(model) and is_restructured(model):
        raise ConfigError("save format 'compressed' stores the zeros of a sparse model compactly; this model was "
                          "structurally pruned (its shapes are smaller, nothing to compress): save it with "
                          "save_format='dense'")
    if save_format == "dense":
        dense = dense_weights_bytes(model)
        out, how = save_compressed(model, tokenizer, out_dir, report, overwrite, merge_lowrank)
    else:
        if merge_lowrank:
            log.info("merged %d low-rank modules into dense weights", _merge(model))
        dense = dense_weights_bytes(model)
        out = save_compressed_folder(model, tokenizer, out_dir, report, overwrite)
        how = ("prunekit compressed format: reload with prunekit.load_model; `prunekit export DIR --save-format "
               "dense` writes a plain transformers folder")
    return out, f"{how}; {describe(storage(out, dense, save_format))}"


def describe(st: dict) -> str:
    """``weights 61.3 MB on disk (folder 63.5 MB), dense-equivalent 269.1 MB: 0.23x``."""
    mb = 2**20
    return (f"weights {st['weights_bytes'] / mb:.1f} MB on disk (folder {st['folder_bytes'] / mb:.1f} MB), "
            f"dense-equivalent {st['dense_equivalent_bytes'] / mb:.1f} MB: {st['weights_ratio']:.2f}x")
