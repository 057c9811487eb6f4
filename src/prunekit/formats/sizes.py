"""What every saved folder reports about itself: the report file (:data:`REPORT_FILE`, written last)
and the sizes measured on the files (``"storage"``), and the sentence that describes them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..models.lowrank import lowrank_modules

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


def read_report(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The prunekit report saved in ``folder`` (what was pruned, how it measured), or ``None``."""
    f = Path(folder).expanduser() / REPORT_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None


def describe(st: dict) -> str:
    """``weights 61.3 MB on disk (folder 63.5 MB), dense-equivalent 269.1 MB: 0.23x``."""
    mb = 2**20
    return (f"weights {st['weights_bytes'] / mb:.1f} MB on disk (folder {st['folder_bytes'] / mb:.1f} MB), "
            f"dense-equivalent {st['dense_equivalent_bytes'] / mb:.1f} MB: {st['weights_ratio']:.2f}x")
