"""The sweep's results file: what makes stored cells comparable, reading/writing, curves and knees.

``results.json`` holds a *signature* — every setting that can change a number (model, tasks,
evaluation settings, calibration, options, dtype, device, threads) — and one row per finished
cell. A resumed sweep whose signature differs is refused with the settings that differ; a
resumed sweep under other library versions is allowed with a warning (the numbers may move in
the last digits), and the versions of every session are kept.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from ..eval.knee import piecewise_knee, tolerance_knee
from ..eval.tasks import TaskSettings
from .config import SweepConfig

log = logging.getLogger(__name__)

RESULTS = "results.json"


def signature(model_name: str, model: nn.Module, config: SweepConfig, settings: TaskSettings) -> dict[str, Any]:
    """What must match for stored cells to be comparable with new ones."""
    p = next(model.parameters())
    sig = {"model": model_name, "tasks": list(config.tasks), "pattern": config.pattern,
           "calib": {k: v for k, v in asdict(config.calib).items() if k != "dataset"},
           "settings": {k: v for k, v in asdict(settings).items() if k not in ("data_dir", "batch_size")},
           "method_options": {k: dict(v) for k, v in config.method_options.items()},
           "allocation_options": {k: dict(v) for k, v in config.allocation_options.items()},
           "dtype": str(p.dtype).replace("torch.", ""), "device": p.device.type, "threads": torch.get_num_threads()}
    return json.loads(json.dumps(sig))  # the form it has after a round trip through results.json


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"settings": {"ppl_seqlen": 32}}`` → ``{"settings.ppl_seqlen": 32}`` (to name what differs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(path: Path, stored: Mapping[str, Any], sig: Mapping[str, Any]) -> list[str]:
    """Refuse incomparable settings; return warnings about version changes (empty if none)."""
    old, new = _flat(stored.get("signature", {})), _flat(sig)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        what = "; ".join(f"{k}: stored {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
        raise ConfigError(f"{path} holds a sweep with different settings ({what}); use another --out folder "
                          "(or delete the file) instead of mixing incomparable numbers")
    now = versions()
    seen = stored.get("versions", [])
    last = seen[-1] if seen else None
    if last is not None and last != now:
        changed = ", ".join(f"{k} {last.get(k)} -> {v}" for k, v in now.items() if last.get(k) != v)
        return [f"resuming {path} under other versions ({changed}): new cells may differ in the last digits"]
    return []


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
        raise ConfigError(f"{path} is corrupt ({e.msg}); delete it to start the sweep afresh") from None


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


def curves(data: dict[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """Rows grouped per (method, allocation, calib), each starting with the dense row at 0%."""
    dense = next((r for r in data["rows"] if r["key"] == "dense"), None)
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in data["rows"]:
        if r["key"] == "dense":
            continue
        out.setdefault((r["method"], r["allocation"], r["calib"]), []).append(r)
    for rows in out.values():
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
