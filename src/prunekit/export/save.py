"""Atomic saving: a hidden temporary folder beside the target, renamed at the very end.

An interrupted or failed save (disk full, Ctrl-C) leaves nothing at ``out_dir``: the temporary
folder is removed and the error names the folder and the fix. The result reloads with plain
``transformers.AutoModelForCausalLM.from_pretrained`` (safetensors).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..models import clear_quantizer

log = logging.getLogger(__name__)

REPORT_FILE = "prunekit_report.json"


class OutputExistsError(FileExistsError):
    pass


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``out_dir`` cannot be written."""
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {str(out)!r} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {str(out)!r} is a file, not a folder; choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write into {str(parent)!r}; choose another --out")
    return out


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def atomic_folder(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False,
                  needed_bytes: int = 0) -> Path:
    """Run ``write(tmp)`` into a temporary folder and move it to ``out_dir`` only on success."""
    out = check_output_dir(out_dir, overwrite)
    parent = out.parent
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes * 1.05:
        raise OSError(errno.ENOSPC, f"not enough disk space in {str(parent)!r}: need about "
                      f"{needed_bytes / 2**20:.0f} MB, {free / 2**20:.0f} MB free; free space or choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        write(tmp)
        if out.exists():  # overwrite: swap, then drop the old folder
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {str(out)!r}; nothing was left behind. "
                          "Free space or choose another --out") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
