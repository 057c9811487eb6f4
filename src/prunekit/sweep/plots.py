"""Plots and the Markdown report of a sweep (matplotlib, optional: ``pip install prunekit[plots]``).

One PNG per metric: the metric against sparsity, one line per method/allocation/calibration,
error bars of one standard error, the dense value as a dashed line, the two-segment knee as a
large marker on its curve and the tolerance knee as a dotted vertical line of the same colour.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

from ..eval.ties import mark
from .results import curves
from ..errors import ConfigError

log = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _label(key: tuple[str, str, str], multi_alloc: bool, multi_calib: bool) -> str:
    method, alloc, calib = key
    parts = [method] + ([alloc] if multi_alloc else []) + ([f"calib={calib}"] if multi_calib else [])
    return " / ".join(parts)


def short_task(task: str) -> str:
    """``mc:/data/my_tasks/facts.jsonl`` → ``mc:facts`` (file specs are long; names are short already)."""
    prefix, sep, rest = task.partition(":")
    if sep and ("/" in rest or "." in rest):
        return f"{prefix}:{Path(rest.split(':')[0]).stem if Path(rest.split(':')[0]).stem != 'task' else Path(rest).parent.name}"
    return task


def metric_title(metric: str) -> str:
    task, _, m = metric.rpartition("/")
    task = short_task(task)
    if task.startswith("ppl:"):
        return f"{task[4:]} perplexity (lower is better)"
    return f"{task} {m} (higher is better)"


def plot_sweep(data: dict[str, Any], out_dir: str | Path, title: str = "") -> dict[str, str]:
    """Write one PNG per metric under ``out_dir``; returns ``{metric: file name}``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ConfigError("plots need matplotlib: pip install matplotlib (or prunekit[plots])") from e

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = curves(data)
    if not groups:
        return {}
    knees = {(k["method"], k["allocation"], k["calib"], k["metric"]): k for k in data.get("knees", [])}
    multi_alloc = len({k[1] for k in groups}) > 1
    multi_calib = len({k[2] for k in groups}) > 1
    metrics = sorted({m for rows in groups.values() for r in rows for m in r["metrics"]})
    dense = next((r for r in data["rows"] if r["key"] == "dense"), None)
    files = {}
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        hib = True
        for i, (key, rows) in enumerate(sorted(groups.items())):
            pts = [(r["sparsity"], r["metrics"][metric]) for r in rows if metric in r["metrics"]]
            if not pts:
                continue
            hib = pts[0][1]["higher_is_better"]
            xs = [100 * s for s, _ in pts]
            ys = [v["value"] for _, v in pts]
            err = [v["stderr"] or 0.0 for _, v in pts]
            color = f"C{i}"
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", ms=4, color=color, capsize=3,
                        label=_label(key, multi_alloc, multi_calib))
            kn = knees.get((*key, metric))
            if kn and kn.get("piecewise_knee") is not None:
                kx = kn["piecewise_knee"]
                ky = next(v["value"] for s, v in pts if abs(s - kx) < 1e-9)
                ax.plot([100 * kx], [ky], marker="D", ms=11, mfc="none", mew=2, color=color, linestyle="none",
                        label=f"{_label(key, multi_alloc, multi_calib)}: knee {100 * kx:.0f}% (2-segment fit)")
            if kn and kn.get("tolerance_knee") is not None and kn["tolerance_knee"] > 0:
                tk = kn["tolerance_knee"]
                tol = kn["tolerance"]
                tol_txt = f"≤{100 * tol:.0f}% rise" if not hib else f"≤{100 * tol:.0f} pt drop"
                ax.axvline(100 * tk, color=color, linestyle=":", lw=1.5,
                           label=f"{_label(key, multi_alloc, multi_calib)}: within tolerance to {100 * tk:.0f}% ({tol_txt})")
        if dense is not None and metric in dense["metrics"]:
            ax.axhline(dense["metrics"][metric]["value"], color="gray", linestyle="--", lw=1, label="dense")
        chance = _chance(dense, metric)
        if chance is not None:
            ax.axhline(chance, color="black", linestyle="-.", lw=0.8, label=f"chance ({chance:.2f})")
        if not hib:
            ax.set_yscale("log")
        ax.set_xlabel("sparsity of pruned linears (%)")
        ax.set_ylabel(metric.rpartition("/")[2] + (" (log scale)" if not hib else ""))
        ax.set_title((title + "\n" if title else "") + metric_title(metric), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        task, _, m = metric.rpartition("/")
        name = f"{_slug(short_task(task) + '_' + m)}.png"
        fig.savefig(out / name)
        plt.close(fig)
        files[metric] = name
    return files


def _chance(dense: dict[str, Any] | None, metric: str) -> float | None:
    if dense is None:
        return None
    task, _, m = metric.rpartition("/")
    if not m.startswith("acc"):
        return None
    return dense.get("tasks", {}).get(task, {}).get("settings", {}).get("chance")


def _fmt(v: dict[str, Any] | None, ref: dict[str, Any] | None = None) -> str:
    """A table cell: perplexity plain; a task value ``x ± se``, marked against ``ref`` (the dense model's)
    with the tie rule of :mod:`prunekit.eval.ties` (≈ a tie, ↑ / ↓ a real difference)."""
    if not v or v.get("value") is None:
        return "-"
    x = v["value"]
    if not v.get("higher_is_better", True):
        return f"{x:.2f}" if math.isfinite(x) and x < 1e4 else f"{x:.3g}"
    text = mark(x, v.get("stderr"), ref.get("value") if ref else None, ref.get("stderr") if ref else None)
    return text.replace("±", " ± ", 1)


def markdown_report(data: dict[str, Any], plots: dict[str, str], plot_dir: str = "plots",
                    title: str = "Sparsity sweep", notes: str = "") -> str:
    """The sweep as Markdown: settings, results table, knees, embedded plots."""
    rows = sorted(data["rows"], key=lambda r: (r["key"] != "dense", r["method"], r["allocation"], r["calib"],
                                               r["sparsity"]))
    metrics = sorted({m for r in rows for m in r["metrics"]}, key=lambda m: (not m.startswith("ppl:"), m))
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    if data.get("command"):
        lines += ["Regenerate (resumable: finished cells are skipped):", "", "```", data["command"], "```", ""]
    cfg, sig = data.get("config", {}), data.get("signature", {})
    lines += ["## Settings", "", f"- model: `{sig.get('model')}`, dtype `{data.get('dtype', '?')}`",
              f"- methods: {', '.join(cfg.get('methods', []))}; allocations: {', '.join(cfg.get('allocations', []))}; "
              f"calibration sources: {', '.join(cfg.get('calibs', []))}; pattern {cfg.get('pattern')}",
              f"- sparsities: {', '.join(f'{100 * s:.0f}%' for s in cfg.get('sparsities', []))} (0% = the dense model, "
              "evaluated once)",
              f"- calibration: {sig.get('calib')}",
              f"- tasks: {', '.join(sig.get('tasks', []))}; evaluation settings: {sig.get('settings')}",
              f"- knee tolerances: {cfg.get('tolerance')} absolute for accuracy-like metrics, "
              f"{cfg.get('ppl_tolerance')} relative for perplexity (docs/evaluation.md#essential-sparsity)"]
    if data.get("environment"):
        env = data["environment"]
        lines.append("- machine: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    dense = next((r for r in rows if r["key"] == "dense"), None)
    if dense:
        lines.append("- examples scored per task: " + ", ".join(f"{k} n={v['n']}" for k, v in dense.get("tasks", {}).items()))
    total = sum(r.get("prune_seconds", 0) + r.get("eval_seconds", 0) for r in rows)
    lines += [f"- wall time of all cells: {total / 60:.1f} min", "", "## Results", "",
              "Values ± one standard error (stderr = sample std / sqrt(n)); perplexity has none. Each task value is "
              "marked against dense: ≈ a tie (the difference is inside two standard errors of the difference), "
              "↑ / ↓ a real difference.", ""]
    head = ["method", "allocation", "calib", "sparsity", "actual"] + metrics + ["prune s", "eval s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        vals = [r["method"], r["allocation"], r["calib"], f"{100 * r['sparsity']:.0f}%",
                f"{100 * r.get('actual_sparsity', 0):.1f}%"]
        vals += [_fmt(r["metrics"].get(m), dense["metrics"].get(m) if dense and r is not dense else None)
                 for m in metrics]
        vals += [f"{r.get('prune_seconds', 0):.0f}", f"{r.get('eval_seconds', 0):.0f}"]
        lines.append("| " + " | ".join(vals) + " |")
    lines += ["", "## Essential sparsity (knees)", "",
              "Tolerance knee: the largest sparsity up to which every point stays within the tolerance of dense. "
              "Two-segment knee: breakpoint of the best continuous two-segment linear fit (ln ppl for perplexity), "
              "reported only when quality falls faster after it; slopes are per 10% sparsity.", "",
              "| method | allocation | calib | metric | tolerance knee | 2-segment knee | slope before | slope after |",
              "|---|---|---|---|---|---|---|---|"]
    for k in data.get("knees", []):
        def pct(x):
            return "-" if x is None else f"{100 * x:.0f}%"

        def sl(x):
            return "-" if x is None else f"{x / 10:.3f}"

        lines.append(f"| {k['method']} | {k['allocation']} | {k['calib']} | {k['metric']} | {pct(k['tolerance_knee'])} "
                     f"| {pct(k['piecewise_knee'])} | {sl(k['slope_before'])} | {sl(k['slope_after'])} |")
    lines += ["", "## Plots", ""]
    for metric, name in plots.items():
        lines += [f"### {metric_title(metric)}", "", f"![{metric} vs sparsity]({plot_dir}/{name})", ""]
    return "\n".join(lines) + "\n"
