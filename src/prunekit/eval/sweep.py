"""Sparsity sweeps: methods × allocations × calibration sources × sparsities → one table.

Every cell starts from the dense weights: the caller's model is never modified; each cell
prunes a fresh in-memory copy (``copy.deepcopy``, cheaper than reloading, and correct also
for methods that replace modules). The dense baseline is evaluated once and stands for every
curve's 0% point. Each finished cell is appended to ``results.json`` (written atomically,
with ``results.csv`` beside it), so an interrupted sweep resumes where it stopped: cells
already in the file are skipped, and a results file made with different evaluation settings
is refused rather than mixed.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from ..config import CalibConfig, PruneConfig
from ..registry import ALLOCATORS, METHODS
from .knee import piecewise_knee, tolerance_knee
from .tasks import Task, TaskSettings, run_tasks

log = logging.getLogger(__name__)

RESULTS = "results.json"


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep and how to score it.

    Attributes:
        methods / allocations / calibs: registered names (``calibs`` are calibration datasets).
        sparsities: target sparsities in [0, 1); 0 is the dense baseline (never pruned).
        pattern: ``unstructured`` (N:M patterns fix the sparsity, so they are not swept).
        calib: nsamples / seqlen / seed / batch size of the calibration (its dataset is replaced
            by each entry of ``calibs``).
        tasks: task specs (``ppl:wikitext2``, ``piqa`` …) scored on every cell.
        tolerance: tolerance knee for higher-is-better metrics (absolute loss, 0.02 = 2 points).
        ppl_tolerance: tolerance knee for perplexity (relative increase, 0.05 = +5%).
    """

    methods: tuple[str, ...] = ("wanda", "magnitude")
    allocations: tuple[str, ...] = ("uniform",)
    sparsities: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    calibs: tuple[str, ...] = ("austen",)
    pattern: str = "unstructured"
    calib: CalibConfig = field(default_factory=lambda: CalibConfig(nsamples=32, seqlen=512))
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    allocation_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tasks: tuple[str, ...] = ("ppl:wikitext2",)
    tolerance: float = 0.02
    ppl_tolerance: float = 0.05

    def __post_init__(self) -> None:
        for attr in ("methods", "allocations", "sparsities", "calibs", "tasks"):
            value = tuple(getattr(self, attr))
            if not value:
                raise ValueError(f"sweep {attr} is empty: give at least one")
            if len(set(value)) != len(value):
                raise ValueError(f"sweep {attr} has duplicates: {list(value)}")
            object.__setattr__(self, attr, value)
        for m in self.methods:
            METHODS.get(m)  # KeyError naming the choices
        for a in self.allocations:
            ALLOCATORS.get(a)
        s = tuple(sorted(float(x) for x in self.sparsities))
        if any(not 0.0 <= x < 1.0 for x in s):
            raise ValueError(f"sweep sparsities {list(s)} must lie in [0, 1), e.g. 0 0.1 ... 0.8")
        object.__setattr__(self, "sparsities", s)
        if ":" in self.pattern:
            raise ValueError(f"pattern {self.pattern!r}: an N:M pattern fixes the sparsity; sweep unstructured sparsity")
        for name, tol in (("tolerance", self.tolerance), ("ppl_tolerance", self.ppl_tolerance)):
            if not (isinstance(tol, (int, float)) and 0 < tol < 1):
                raise ValueError(f"{name}={tol!r} must be a fraction in (0, 1)")

    def cells(self) -> list[dict[str, Any]]:
        """The pruned cells in run order (sparsity 0 is the shared dense baseline, not a cell).

        Sparsity is the outer loop, so an interrupted sweep has every curve up to the same sparsity.
        """
        return [dict(method=m, allocation=a, calib=c, sparsity=s)
                for s in self.sparsities if s > 0 for c in self.calibs for a in self.allocations for m in self.methods]


def cell_key(cell: Mapping[str, Any]) -> str:
    return f"{cell['method']}|{cell['allocation']}|{cell['calib']}|{float(cell['sparsity']):.4f}"


def metric_values(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"piqa/acc": {"value", "stderr", "higher_is_better", "n"}, "ppl:wikitext2/ppl": …}``."""
    out = {}
    for spec, r in results.items():
        for m, v in r.metrics.items():
            if m == "nll":
                continue
            out[f"{spec}/{m}"] = {"value": v, "stderr": r.stderr.get(m), "higher_is_better": r.higher_is_better,
                                  "n": r.n, "main": m == r.main}
    return out


def _signature(model_name: str, config: SweepConfig, settings: TaskSettings) -> dict[str, Any]:
    """What must match for stored cells to be comparable with new ones."""
    sig = {"model": model_name, "tasks": list(config.tasks), "pattern": config.pattern,
            "calib": {k: v for k, v in asdict(config.calib).items() if k != "dataset"},
            "settings": {k: v for k, v in asdict(settings).items() if k not in ("data_dir", "batch_size")},
            "method_options": {k: dict(v) for k, v in config.method_options.items()},
            "allocation_options": {k: dict(v) for k, v in config.allocation_options.items()}}
    return json.loads(json.dumps(sig))  # the form it has after a round trip through results.json


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_results(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt ({e.msg}); delete it to start the sweep afresh") from None


def save_results(out_dir: str | Path, data: dict[str, Any]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / RESULTS, json.dumps(data, indent=1))
    write_csv(out / "results.csv", data["rows"])


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    metrics = sorted({m for r in rows for m in r["metrics"]})
    head = ["method", "allocation", "calib", "sparsity", "actual_sparsity", "prune_seconds", "eval_seconds"]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head + [c for m in metrics for c in (m, f"{m}_stderr")])
        for r in rows:
            vals = [r.get(h) for h in head]
            for m in metrics:
                v = r["metrics"].get(m, {})
                vals += [v.get("value"), v.get("stderr")]
            w.writerow(vals)
    os.replace(tmp, path)


def run_sweep(
    model: nn.Module,
    tokenizer,
    config: SweepConfig,
    tasks: dict[str, Task],
    settings: TaskSettings,
    out_dir: str | Path,
    model_name: str = "model",
    extra: Mapping[str, Any] | None = None,
    on_cell: Callable[[str, dict[str, Any] | None, int, int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the results dict also stored in ``out_dir/results.json``.

    Args:
        model: the dense model (left unchanged).
        tasks: prepared tasks (``prepare_tasks(config.tasks)``), scored on every cell.
        extra: facts to record (environment, command line, dtype).
        on_cell: called as ``on_cell(key, row_or_None_if_skipped, i, total)``.
    """
    from ..api import prune  # noqa: PLC0415 - api imports eval
    from ..data import calibration_ids  # noqa: PLC0415

    if list(tasks) != list(config.tasks):
        raise ValueError(f"prepared tasks {list(tasks)} differ from the sweep's tasks {list(config.tasks)}")
    sig = _signature(model_name, config, settings)
    data = load_results(out_dir)
    if data is not None and data.get("signature") != sig:
        raise ValueError(
            f"{Path(out_dir) / RESULTS} holds a sweep with different model/tasks/evaluation settings; "
            "use another --out folder (or delete the file) instead of mixing incomparable numbers"
        )
    if data is None:
        data = {"signature": sig, "rows": []}
    data["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    data.update(extra or {})
    done = {r["key"] for r in data["rows"]}
    cells = config.cells()
    total = len(cells) + 1

    if "dense" not in done:
        t0 = time.perf_counter()
        res = run_tasks(model, tokenizer, tasks, settings)
        row = {"key": "dense", "method": "dense", "allocation": "-", "calib": "-", "sparsity": 0.0,
               "actual_sparsity": 0.0, "prune_seconds": 0.0, "eval_seconds": time.perf_counter() - t0,
               "metrics": metric_values(res), "tasks": {k: _brief(r) for k, r in res.items()}}
        data["rows"].append(row)
        save_results(out_dir, data)
        if on_cell:
            on_cell("dense", row, 1, total)
    elif on_cell:
        on_cell("dense", None, 1, total)

    calib_cache: dict[str, Any] = {}
    for i, cell in enumerate(cells, 2):
        key = cell_key(cell)
        if key in done:
            if on_cell:
                on_cell(key, None, i, total)
            continue
        work = copy.deepcopy(model)
        calib_cfg = CalibConfig(**{**asdict(config.calib), "dataset": cell["calib"]})
        pcfg = PruneConfig(method=cell["method"], sparsity=cell["sparsity"], pattern=config.pattern,
                           allocation=cell["allocation"],
                           method_options=dict(config.method_options.get(cell["method"], {})),
                           allocation_options=dict(config.allocation_options.get(cell["allocation"], {})),
                           calib=calib_cfg)
        needs = METHODS.get(cell["method"]).needs_calibration or ALLOCATORS.get(cell["allocation"]).needs_calibration
        if needs and cell["calib"] not in calib_cache:
            calib_cache[cell["calib"]] = calibration_ids(calib_cfg, tokenizer)
        t0 = time.perf_counter()
        report = prune(work, pcfg, calib=calib_cache.get(cell["calib"]), tokenizer=tokenizer)
        t1 = time.perf_counter()
        res = run_tasks(work, tokenizer, tasks, settings)
        row = {"key": key, **cell, "actual_sparsity": report.sparsity, "prune_seconds": t1 - t0,
               "eval_seconds": time.perf_counter() - t1, "metrics": metric_values(res),
               "tasks": {k: _brief(r) for k, r in res.items()}}
        data["rows"].append(row)
        save_results(out_dir, data)
        del work
        if on_cell:
            on_cell(key, row, i, total)
    data["knees"] = knees(data, config)
    save_results(out_dir, data)
    return data


def _brief(r) -> dict[str, Any]:
    return {"n": r.n, "seconds": r.seconds, "tokens": r.tokens, "examples_per_s": r.examples_per_s,
            "tokens_per_s": r.tokens_per_s, "settings": r.settings}


def curves(data: dict[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Rows grouped per (method, allocation, calib), each starting with the dense row at 0%."""
    dense = next((r for r in data["rows"] if r["key"] == "dense"), None)
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        if r["key"] == "dense":
            continue
        out.setdefault((r["method"], r["allocation"], r["calib"]), []).append(r)
    for k, rows in out.items():
        rows.sort(key=lambda r: r["sparsity"])
        if dense is not None:
            rows.insert(0, dense)
    return out


def knees(data: dict[str, Any], config: SweepConfig | None = None) -> list[dict[str, Any]]:
    """Both knees (see :mod:`prunekit.eval.knee`) for every curve and metric."""
    cfg = data.get("config", {})
    tol = config.tolerance if config else cfg.get("tolerance", 0.02)
    ppl_tol = config.ppl_tolerance if config else cfg.get("ppl_tolerance", 0.05)
    out = []
    for (method, alloc, calib), rows in curves(data).items():
        metrics = sorted({m for r in rows for m in r["metrics"]})
        for m in metrics:
            pts = [(r["sparsity"], r["metrics"][m]["value"]) for r in rows if m in r["metrics"]]
            if len(pts) < 2:
                continue
            hib = rows[0]["metrics"][m]["higher_is_better"]
            s, q = [p[0] for p in pts], [p[1] if p[1] is not None else math.inf for p in pts]
            pk = piecewise_knee(s, q, hib)
            out.append({"method": method, "allocation": alloc, "calib": calib, "metric": m,
                        "tolerance": tol if hib else ppl_tol,
                        "tolerance_knee": tolerance_knee(s, q, hib, tol if hib else ppl_tol),
                        "piecewise_knee": pk.sparsity if pk else None,
                        "slope_before": pk.slope_before if pk else None, "slope_after": pk.slope_after if pk else None})
    return out
