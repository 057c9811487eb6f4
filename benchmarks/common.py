"""What the benchmarks share: machine facts, the matmul rate, timing, results files and folder sizes.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``: ``from common import …``.
Versions, CPU model and threads come from :func:`prunekit.report.environment`; this module adds what the
library does not record (CPU flags, the measured matmul rate, timings).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable


# -- the machine -----------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def matmul_gflops(dtype, n: int = 2048, reps: int = 10) -> float:
    """This machine's dense ``n x n`` matmul rate in ``dtype`` (GFLOP/s), after three untimed products."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / mean_seconds(lambda: a @ b, reps) / 1e9


def matmul_rates() -> dict[str, float]:
    """``{"float32": GFLOP/s, "bfloat16": GFLOP/s}``: the floor that benchmark times are compared with."""
    import torch

    return {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}


# -- timing ----------------------------------------------------------------------------------------------
def seconds(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mean_seconds(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Mean wall seconds of ``fn`` over ``reps`` back-to-back calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def spread(samples: list[float]) -> dict[str, float]:
    """``{"median", "min", "max"}`` of timing samples."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def median_time(fn: Callable[[], Any], reps: int = 15, warmup: int = 1) -> dict[str, float]:
    """:func:`spread` of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return spread([seconds(fn) for _ in range(reps)])


# -- results ---------------------------------------------------------------------------------------------
def load_json(path: str | Path, empty: dict | None = None) -> dict:
    """The JSON object in ``path``, or a fresh copy of ``empty`` (default ``{}``) where there is no file."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    return copy.deepcopy(empty) if empty is not None else {}


def save_json(path: str | Path, data: Any, indent: int = 1) -> None:
    """Write ``data`` as JSON, whole or not at all (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str))
    os.replace(tmp, path)


def write_results(stem: str | Path, data: Any, render: Callable[[Any], str] | None = None, indent: int = 1) -> None:
    """``STEM.json`` and, with ``render``, ``STEM.md`` (the table the JSON renders to)."""
    stem = Path(stem)
    save_json(stem.with_name(stem.name + ".json"), data, indent)
    if render is not None:
        stem.with_name(stem.name + ".md").write_text(render(data))


def folder_mb(path: str | Path, pattern: str = "*.safetensors") -> float:
    """MiB of the files matching ``pattern`` under ``path`` (the weights of a saved model by default)."""
    return sum(f.stat().st_size for f in Path(path).rglob(pattern)) / 2**20
