"""The plain Hugging Face folder (``config.json`` + safetensors): written atomically, read by
``transformers.AutoModelForCausalLM.from_pretrained`` anywhere, and the format every folder without
a prunekit manifest is read in (local folders and hub ids alike)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.lowrank import merge_lowrank
from ..models.runtime import clear_quantizer
from .atomic import atomic_folder
from .base import FORMATS, Format
from .sizes import dense_weights_bytes, model_bytes, write_report

log = logging.getLogger(__name__)

LOADER = "transformers.AutoModelForCausalLM.from_pretrained"


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Save model (safetensors), tokenizer and the prunekit report atomically."""
    clear_quantizer(model)
    dense = dense_weights_bytes(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report, dense, "dense")

    out = atomic_folder(out_dir, write, overwrite, needed_bytes=model_bytes(model))
    log.info("saved %s", out)
    return out


def save_merged(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                overwrite: bool = False) -> Path:
    """Merge every factor pair into a dense linear (the model is modified) and save plain safetensors."""
    n = merge_lowrank(model)
    log.info("merged %d low-rank modules into dense weights", n)
    return save_model(model, tokenizer, out_dir, report, overwrite)


class DenseFormat(Format):
    """A plain Hugging Face folder; recognises any folder with a ``config.json`` (asked last)."""

    name = "dense"
    order = 100
    loader = LOADER

    def detect(self, path: str | os.PathLike) -> bool:
        return (Path(path) / "config.json").is_file()

    def save(self, model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
             overwrite: bool = False) -> tuple[Path, str]:
        return save_model(model, tokenizer, out_dir, report, overwrite), f"plain safetensors: reload with {LOADER}"

    def load(self, path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                    use_safetensors=None if allow_pickle else True)


DENSE = FORMATS.add("dense", DenseFormat(), help="plain Hugging Face folder (safetensors), loads anywhere")
