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


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Save model (safetensors), tokenizer and the prunekit report atomically."""
    clear_quantizer(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))

    out = atomic_folder(out_dir, write, overwrite, needed_bytes=model_bytes(model))
    log.info("saved %s", out)
    return out
