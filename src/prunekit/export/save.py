"""Saving a model as a plain Hugging Face folder (safetensors), atomically (:mod:`.atomic`).

The result reloads with plain ``transformers.AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..models import clear_quantizer
from .atomic import atomic_folder

log = logging.getLogger(__name__)

REPORT_FILE = "prunekit_report.json"


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file in the folder except the report (which records this number)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name != REPORT_FILE)


def weights_bytes(path: str | os.PathLike) -> int:
    """Bytes of the folder's safetensors files (the weights as stored)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def dense_weights_bytes(model: nn.Module) -> int:
    """Bytes of the weights at full size: every tensor dense, tied ones once, low-rank factors merged."""
    from ..models.lowrank import lowrank_modules

    lowrank = lowrank_modules(model)
    total, seen = 0, set()
    for name, t in model.state_dict(keep_vars=True).items():  # tied parameters: one object (also on meta)
        if id(t) in seen:
            continue
        seen.add(id(t))
        mod, _, leaf = name.rpartition(".")
        owner = mod.rpartition(".")[0]
        if owner in lowrank and leaf == "weight":  # down/up factors count as the merged [out, in] weight
            if mod.endswith(".down"):
                total += lowrank[owner].in_features * lowrank[owner].out_features * t.element_size()
            continue
        total += t.numel() * t.element_size()
    return total


def storage(folder: str | os.PathLike, dense_bytes: int, save_format: str) -> dict[str, Any]:
    """What the report says about the saved folder's size, measured on the files."""
    w = weights_bytes(folder)
    return {"save_format": save_format, "folder_bytes": folder_bytes(folder), "weights_bytes": w,
            "dense_equivalent_bytes": dense_bytes, "weights_ratio": w / dense_bytes if dense_bytes else None}


def write_report(folder: Path, report: dict[str, Any] | None, dense_bytes: int, save_format: str) -> None:
    """Write the report last, with the folder's measured sizes under ``"storage"``."""
    if report is not None:
        report = {**report, "storage": storage(folder, dense_bytes, save_format)}
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))


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
