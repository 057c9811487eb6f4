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
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.data_ptr() and key in seen:
            continue
        seen.add(key)
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
    dense = dense_weights_bytes(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report, dense, "dense")

    out = atomic_folder(out_dir, write, overwrite, needed_bytes=model_bytes(model))
    log.info("saved %s", out)
    return out
