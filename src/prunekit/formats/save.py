"""Choosing the format a model is saved in, and saving it there; what the CLI asks instead of knowing formats.

The user picks one of :data:`SAVE_FORMATS`:

* ``dense`` (default): the format the model needs to load anywhere it can — a plain Hugging Face
  folder (:mod:`.dense`); prunekit's factorized low-rank folder (:mod:`.lowrank`) when the model
  holds low-rank modules (unless ``merge_lowrank``, which multiplies them back); for a structurally
  pruned model a plain folder with a smaller config, or prunekit's structured folder when no stock
  config can say its shapes (:mod:`.structured`).
* ``compressed``: prunekit's sparse format (:mod:`.compressed`): non-zeros plus a bitmask, or N:M
  values plus packed indices, per decoder block; low-rank modules stay factorized. Only
  ``prunekit.load_model`` reads it; ``prunekit export DIR --save-format dense`` converts back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..models.lowrank import lowrank_modules, merge_lowrank as merge_factors
from .base import Format
from .compressed import COMPRESSED
from .dense import DENSE, LOADER, save_merged
from .lowrank import LOWRANK
from .sizes import dense_weights_bytes, describe, storage, write_report
from .structured import STRUCTURED
from .structured_plain import is_restructured

log = logging.getLogger(__name__)

SAVE_FORMATS = ("dense", "compressed")

#: what a folder written block by block while streaming is, by the kind :func:`streamed_kind` names
STREAMED = {"compressed": "prunekit compressed format", "lowrank": "prunekit low-rank format",
            "dense": "plain safetensors shards"}

_MERGED = f"plain safetensors (low-rank factors merged: no size saving): reload with {LOADER}"


def check_save_format(save_format: str, structured: bool = False, pattern: str = "") -> None:
    """Refuse, before any work, a save format unknown or useless for the pattern (``structured``: smaller shapes)."""
    if save_format not in SAVE_FORMATS:
        raise ConfigError(f"save format {save_format!r} is not one of: {', '.join(SAVE_FORMATS)}")
    if structured and save_format == "compressed":
        raise ConfigError(f"--save-format compressed stores the zeros of a sparse model compactly; --pattern "
                          f"{pattern} removes them outright (the saved model is already smaller): drop "
                          "--save-format compressed")


def choose(model: nn.Module, save_format: str = "dense", merge_lowrank: bool = False) -> Format:
    """The registered format ``model`` is saved in when the user asks for ``save_format``."""
    check_save_format(save_format)
    factorized = bool(lowrank_modules(model))
    if save_format == "compressed":
        if not factorized and is_restructured(model):
            raise ConfigError("save format 'compressed' stores the zeros of a sparse model compactly; this model was "
                              "structurally pruned (its shapes are smaller, nothing to compress): save it with "
                              "save_format='dense'")
        return COMPRESSED
    if not factorized and is_restructured(model):  # structurally pruned: smaller shapes
        return STRUCTURED
    return LOWRANK if factorized and not merge_lowrank else DENSE


def _save(fmt: Format, model: nn.Module, tokenizer, out_dir, report, overwrite) -> tuple[Path, str]:
    if fmt is DENSE and lowrank_modules(model):  # choose() gives dense to a factorized model only to merge it
        return save_merged(model, tokenizer, out_dir, report, overwrite), _MERGED
    return fmt.save(model, tokenizer, out_dir, report, overwrite)


def save_compressed(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                    overwrite: bool = False, merge: bool = False) -> tuple[Path, str]:
    """Save in the format the ``dense`` choice gives; returns the folder and a sentence saying what loads it.

    (The name is historical: it saves what the model needs — plain, low-rank or structured.)
    """
    return _save(choose(model, "dense", merge), model, tokenizer, out_dir, report, overwrite)


def save_folder(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                overwrite: bool = False, merge_lowrank: bool = False, save_format: str = "dense") -> tuple[Path, str]:
    """Save atomically in ``save_format``; returns the folder and one sentence: what loads it, how big it is.

    The report (when given) is written into the folder with the measured sizes under
    ``"storage"``: ``folder_bytes`` (every file but the report), ``weights_bytes`` (the
    safetensors files) and ``dense_equivalent_bytes`` (every weight at full size, tied ones once,
    low-rank factors merged).
    """
    fmt = choose(model, save_format, merge_lowrank)
    if fmt is COMPRESSED and merge_lowrank:
        log.info("merged %d low-rank modules into dense weights", merge_factors(model))
    dense = dense_weights_bytes(model)
    out, how = _save(fmt, model, tokenizer, out_dir, report, overwrite)
    return out, f"{how}; {describe(storage(out, dense, save_format))}"


def streamed_kind(model: nn.Module, save_format: str) -> str:
    """What a folder written block by block is: ``compressed``, ``lowrank`` (factorized modules) or ``dense``."""
    if save_format == "compressed":
        return "compressed"
    return "lowrank" if lowrank_modules(model) else "dense"


def finish_streamed(folder: Path, report: dict | None, model: nn.Module, save_format: str) -> tuple[int, str]:
    """Write the report of a folder written block by block; returns ``(dense bytes, kind)`` for
    :func:`describe_streamed`."""
    kind = streamed_kind(model, save_format)
    dense = dense_weights_bytes(model)
    write_report(folder, report, dense, kind)
    return dense, kind


def describe_streamed(out: str | os.PathLike, dense_bytes: int, kind: str) -> str:
    """``prunekit compressed format; weights 61.3 MB on disk (...)``."""
    return f"{STREAMED[kind]}; {describe(storage(out, dense_bytes, kind))}"
