"""Sparsity sweeps: methods × allocations × calibration sources × sparsities → one table.

Every cell starts from the dense weights: the caller's model is never modified; each cell
prunes a fresh in-memory copy (``copy.deepcopy``, cheaper than reloading, and correct also
for methods that replace modules). A cell is one :func:`prunekit.pipeline.run` (:func:`run_cell`):
its spec holds the copy, the calibration ids drawn once per source, the tasks prepared once, and
no output folder, so the run loads, draws, prepares and saves nothing. The dense baseline is
evaluated once and stands for every curve's 0% point. Each finished cell is appended to ``results.json`` (written atomically,
with ``results.csv`` beside it), so an interrupted sweep resumes where it stopped: cells
already in the file are skipped, and a results file made with different settings is refused
rather than mixed (:mod:`prunekit.sweep.results`).

This module sits beside :mod:`prunekit.pipeline` (it runs one pipeline per cell), above the library.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from ..config import CalibConfig, PruneConfig
from ..data import calibration_ids
from ..eval.tasks import Task, TaskSettings, run_tasks
from ..pipeline import Events, RunSpec, run
from ..registry import ALLOCATORS, METHODS
from .config import SweepConfig, cell_key
from .results import (check_resumable, knees, load_results, metric_values, order_rows, save_results, signature,
                      versions)

log = logging.getLogger(__name__)

OnCell = Callable[[str, "dict[str, Any] | None", int, int], None]


def prune_config(config: SweepConfig, cell: Mapping[str, Any]) -> PruneConfig:
    """The :class:`PruneConfig` of one cell."""
    calib_cfg = CalibConfig(**{**asdict(config.calib), "dataset": cell["calib"]})
    return PruneConfig(method=cell["method"], sparsity=cell["sparsity"], pattern=config.pattern,
                       allocation=cell["allocation"],
                       method_options=dict(config.method_options.get(cell["method"], {})),
                       allocation_options=dict(config.allocation_options.get(cell["allocation"], {})),
                       calib=calib_cfg)


def needs_calibration(cell: Mapping[str, Any]) -> bool:
    return METHODS.get(cell["method"]).needs_calibration or ALLOCATORS.get(cell["allocation"]).needs_calibration


def calibration_for(config: SweepConfig, cell: Mapping[str, Any], tokenizer, settings: TaskSettings,
                    cache: dict[str, Tensor]) -> Tensor | None:
    """The cell's calibration ids, drawn once per calibration source and kept in ``cache``
    (``None`` when neither its method nor its allocation calibrates)."""
    if not needs_calibration(cell):
        return None
    if cell["calib"] not in cache:
        cache[cell["calib"]] = calibration_ids(prune_config(config, cell).calib, tokenizer, settings.data_dir)
    return cache[cell["calib"]]


def cell_spec(model: nn.Module, tokenizer, config: SweepConfig, cell: Mapping[str, Any], tasks: dict[str, Task],
              settings: TaskSettings, calib: Tensor | None, model_name: str = "model") -> RunSpec:
    """The :class:`~prunekit.pipeline.RunSpec` of one cell: ``model`` (pruned in place) compressed as the cell
    says with the given calibration ids, scored on the prepared tasks only (no dense baseline, no
    perplexity window of its own: the sweep's perplexity is a ``ppl:`` task), nothing saved."""
    return RunSpec(model, compression=prune_config(config, cell), tokenizer=tokenizer, model_name=model_name,
                   calib_ids=calib, eval_datasets=(), dense_eval=False, tasks=tasks, task_settings=settings,
                   offload="none", data_dir=settings.data_dir)


def run_cell(model: nn.Module, tokenizer, config: SweepConfig, cell: Mapping[str, Any], tasks: dict[str, Task],
             settings: TaskSettings, calib: Tensor | None, model_name: str = "model",
             events: Events | None = None) -> dict[str, Any]:
    """Prune a copy of the dense ``model`` as ``cell`` says and score it — one :func:`prunekit.pipeline.run` —
    and return its results row (the serial and the Ray executor both run cells through here)."""
    work = copy.deepcopy(model)
    result = run(cell_spec(work, tokenizer, config, cell, tasks, settings, calib, model_name), events)
    return {"key": cell_key(cell), **cell, "actual_sparsity": result.report.sparsity,
            "prune_seconds": result.seconds["compress"], "eval_seconds": result.seconds["evaluate"],
            "metrics": metric_values(result.tasks), "tasks": {k: _brief(r) for k, r in result.tasks.items()}}


def dense_row(model: nn.Module, tokenizer, tasks: dict[str, Task], settings: TaskSettings) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = run_tasks(model, tokenizer, tasks, settings)
    return {"key": "dense", "method": "dense", "allocation": "-", "calib": "-", "sparsity": 0.0,
            "actual_sparsity": 0.0, "prune_seconds": 0.0, "eval_seconds": time.perf_counter() - t0,
            "metrics": metric_values(res), "tasks": {k: _brief(r) for k, r in res.items()}}


def open_results(out_dir: str | Path, model_name: str, model: nn.Module, config: SweepConfig,
                 settings: TaskSettings, extra: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """The results dict to continue (checked comparable) or a fresh one, and any version warnings."""
    return resume_results(out_dir, signature(model_name, model, config, settings), config, extra)


def resume_results(out_dir: str | Path, sig: Mapping[str, Any], config: SweepConfig,
                   extra: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """:func:`open_results` for a signature the caller made (an executor whose driver holds no model)."""
    data = load_results(out_dir)
    warnings: list[str] = []
    if data is None:
        data = {"signature": dict(sig), "rows": []}
    else:
        warnings = check_resumable(Path(out_dir) / "results.json", data, sig)
    data["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    data.update(extra or {})
    seen = data.setdefault("versions", [])
    if not seen or seen[-1] != versions():
        seen.append(versions())
    for w in warnings:
        log.warning(w)
    return data, warnings


def add_row(out_dir: str | Path, data: dict[str, Any], config: SweepConfig, row: dict[str, Any]) -> None:
    """Store one finished row: rows in the config's cell order, the file rewritten atomically."""
    data["rows"].append(row)
    order_rows(data, config)
    save_results(out_dir, data)


def run_sweep(
    model: nn.Module,
    tokenizer,
    config: SweepConfig,
    tasks: dict[str, Task],
    settings: TaskSettings,
    out_dir: str | Path,
    model_name: str = "model",
    extra: Mapping[str, Any] | None = None,
    on_cell: OnCell | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep serially; returns the results dict also stored in ``out_dir/results.json``.

    Args:
        model: the dense model (left unchanged).
        tasks: prepared tasks (``prepare_tasks(config.tasks)``), scored on every cell.
        extra: facts to record (environment, command line).
        on_cell: called as ``on_cell(key, row_or_None_if_skipped, i, total)``.
    """
    if list(tasks) != list(config.tasks):
        raise ValueError(f"prepared tasks {list(tasks)} differ from the sweep's tasks {list(config.tasks)}")
    data, _ = open_results(out_dir, model_name, model, config, settings, extra)
    done = {r["key"] for r in data["rows"]}
    cells = config.cells()
    total = len(cells) + 1
    notify = on_cell or (lambda *a: None)
    if "dense" not in done:
        row = dense_row(model, tokenizer, tasks, settings)
        add_row(out_dir, data, config, row)
        notify("dense", row, 1, total)
    else:
        notify("dense", None, 1, total)
    calib_cache: dict[str, Tensor] = {}
    for i, cell in enumerate(cells, 2):
        key = cell_key(cell)
        if key in done:
            notify(key, None, i, total)
            continue
        calib = calibration_for(config, cell, tokenizer, settings, calib_cache)
        row = run_cell(model, tokenizer, config, cell, tasks, settings, calib, model_name)
        add_row(out_dir, data, config, row)
        notify(key, row, i, total)
    data["knees"] = knees(data, config)
    save_results(out_dir, data)
    return data


def _brief(r) -> dict[str, Any]:
    return {"n": r.n, "seconds": r.seconds, "tokens": r.tokens, "examples_per_s": r.examples_per_s,
            "tokens_per_s": r.tokens_per_s, "settings": r.settings}
