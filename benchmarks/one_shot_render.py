"""Render benchmarks/results/one_shot.json (written by bench_one_shot.py) as Markdown."""

from __future__ import annotations

import math

DENSE_WT2 = "smol/dense"
GRID_METHODS = [("wanda", "Wanda"), ("sparsegpt", "SparseGPT"), ("ria", "RIA"), ("alps", "ALPS"),
                ("wanda+swaps", "Wanda + SparseSwaps (K=64)"), ("wanda+rec", "Wanda + reconstruct"),
                ("sparsegpt+rec", "SparseGPT + reconstruct"), ("alps+rec", "ALPS + reconstruct")]
GRID_TARGETS = ["50", "60", "70", "80", "2:4"]


def _ppl(rec: dict | None, dataset: str = "wikitext2", full: bool = False) -> float | None:
    if not rec:
        return None
    if full:
        return rec.get("full", {}).get(dataset, {}).get("ppl")
    for k in sorted(k for k in rec if k.startswith("ppl@")):
        v = rec[k].get(dataset, {}).get("ppl")
        if v is not None:
            return v
    return None


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "–"
    if not math.isfinite(v) or v >= 1e4:
        return f"{v:.3g}"
    return f"{v:.{digits}f}"


def _windows(data: dict) -> str:
    ns = sorted({k for r in data["rows"].values() for k in r if k.startswith("ppl@")})
    return ", ".join(n.split("@")[1] for n in ns) or "–"


def _grid(data: dict, dataset: str) -> list[str]:
    rows = data["rows"]
    out = ["| method | " + " | ".join(GRID_TARGETS) + " |", "|---|" + "---|" * len(GRID_TARGETS)]
    for key, label in GRID_METHODS:
        cells = []
        for t in GRID_TARGETS:
            rec = rows.get(f"smol/{key}/{t}")
            v = _ppl(rec, dataset)
            secs = rec.get("prune", {}).get("prune_s") if rec else None
            cells.append("–" if v is None else f"{_fmt(v)} ({secs:.0f} s)" if secs is not None else _fmt(v))
        if any(c != "–" for c in cells):
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def _targets(data: dict) -> list[str]:
    rows = data["rows"]
    dense = _ppl(rows.get(DENSE_WT2))
    dense_full = _ppl(rows.get(DENSE_WT2), full=True)
    out = ["| target | bar | best row | WikiText-2 ppl (first windows) | full test | met |", "|---|---|---|---|---|---|"]
    specs = [("70 % unstructured", lambda r: r["spec"]["pattern"] == "unstructured" and r["spec"]["sparsity"] == 0.7,
              lambda d: 110.0),
             ("2:4", lambda r: r["spec"]["pattern"] == "2:4", lambda d: 100.0),
             ("50 % unstructured", lambda r: r["spec"]["pattern"] == "unstructured" and r["spec"]["sparsity"] == 0.5,
              lambda d: 1.5 * d if d else None)]
    for name, pick, bar in specs:
        cands = [(k, r) for k, r in rows.items() if k.startswith("smol/") and k != DENSE_WT2 and pick(r)
                 and _ppl(r) is not None]
        if not cands:
            continue
        k, r = min(cands, key=lambda kr: _ppl(kr[1], full=True) or _ppl(kr[1]))
        b = bar(dense_full or dense)
        v_full, v = _ppl(r, full=True), _ppl(r)
        judged = v_full if v_full is not None else v
        met = "–" if b is None else ("yes" if judged <= b else "NO")
        out.append(f"| {name} | ≤ {_fmt(b)} | `{k}` | {_fmt(v)} | {_fmt(v_full)} | {met} |")
    return out


def _list(data: dict, prefix: str, cols: list[str]) -> list[str]:
    rows = data["rows"]
    out = ["| row | what | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for k, r in rows.items():
        if not k.startswith(prefix):
            continue
        p = r.get("prune", {})
        cells = {"WikiText-2": _fmt(_ppl(r)), "WT2 valid": _fmt(_ppl(r, r["spec"].get("eval_text", "wikitext2"))),
                 "GSM8K": _fmt(_ppl(r, "gsm8k")), "full WT2": _fmt(_ppl(r, full=True)),
                 "prune s": _fmt(p.get("prune_s"), 0), "block step s": _fmt(p.get("block_step_s"), 0),
                 "sparsity": _fmt(p.get("sparsity"), 4), "params": str(p.get("structure") or "–"),
                 "peak MB": _fmt(p.get("peak_rss_mb"), 0)}
        out.append(f"| `{k}` | {r['spec']['describe']} | " + " | ".join(cells[c] for c in cols) + " |")
    return out


def _structured(data: dict) -> list[str]:
    """Structured rows (channels, width) next to the same row with reconstruction: what it gains."""
    rows = data["rows"]
    out = ["| structure | calibration | method | WikiText-2 | + reconstruct | GSM8K | + reconstruct | prune s (+ rec) |",
           "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        spec = r["spec"]
        if spec["pattern"] not in ("channels", "width", "heads", "blocks", "ffn") or spec.get("refine") \
                or "+" in k.split("/")[1]:
            continue
        parts = k.split("/")
        rec = rows.get("/".join([parts[0], parts[1] + "+rec"] + parts[2:]))
        secs = [x.get("prune", {}).get("prune_s") for x in (r, rec) if x]
        out.append(f"| {spec['pattern']} {spec['sparsity']:.0%} | {spec['nsamples']} x {spec['seqlen']} | {spec['method']} | "
                   f"{_fmt(_ppl(r))} | {_fmt(_ppl(rec))} | {_fmt(_ppl(r, 'gsm8k'))} | {_fmt(_ppl(rec, 'gsm8k'))} | "
                   + " / ".join(f"{s:.0f}" for s in secs if s is not None) + " |")
    return out if len(out) > 2 else []


def _task_results(rec: dict) -> dict | None:
    """A row's task results: from ``--full`` (with the full test split) or ``--tasks`` (alone)."""
    return (rec.get("full") or {}).get("tasks") or (rec.get("tasks") or {}).get("tasks")


def _tasks(data: dict) -> list[str]:
    rows = data["rows"]
    measured = {k: r for k, r in rows.items() if _task_results(r)}
    if not measured:
        return []
    base = measured.get(DENSE_WT2)
    out = ["| row | WikiText-2 (first windows) | full WikiText-2 | PIQA acc | BoolQ acc |", "|---|---|---|---|---|"]
    for k, r in measured.items():
        cells = []
        for task in ("piqa", "boolq"):
            t = _task_results(r).get(task)
            if not t:
                cells.append("–")
                continue
            v, se = t["metrics"]["acc"], t["stderr"].get("acc", 0.0)
            mark = ""
            if base and k != DENSE_WT2 and task in _task_results(base):
                b = _task_results(base)[task]
                diff = v - b["metrics"]["acc"]
                mark = " (tie)" if abs(diff) <= 2 * math.hypot(se, b["stderr"].get("acc", 0.0)) else \
                    (" (worse)" if diff < 0 else " (better)")
            cells.append(f"{v:.3f} ± {se:.3f} (n={t['n']}){mark}")
        out.append(f"| `{k}` | {_fmt(_ppl(r))} | {_fmt(_ppl(r, full=True))} | " + " | ".join(cells) + " |")
    return out


def render(data: dict) -> str:
    rows = data["rows"]
    out = ["# One-shot pruning at high sparsity: reconstruction, SparseSwaps, ALPS, RIA", ""]
    out += ["Generated by `benchmarks/bench_one_shot.py` from `one_shot.json`. SmolLM2-135M in memory, fp32; "
            "calibration Austen, seed 0, 128 x 1024 tokens (the same ids for every row: `calib_sha` in the JSON) "
            "unless a row says otherwise; WikiText-2 test perplexity by the core.md protocol (seqlen 1024, "
            f"first N windows, N = {_windows(data)}; 'full' = every window of the test split); held-out domain: "
            "GSM8K test problems (first 20 windows of 1024); tasks on the first 500 examples, acc ± one standard "
            "error, '(tie)' when within two combined standard errors of the dense model.", ""]
    machines = sorted({f"{r['machine']['processor']} ({r['machine']['cpu_flags'] or 'no bf16 flags'}), "
                       f"{r['machine']['threads']} threads, torch {r['machine']['torch']}, transformers "
                       f"{r['machine']['transformers']}" for r in data.get("runs", [])})
    out += ["Machines: " + "; ".join(machines), ""]
    out += ["## Targets (issue 30)", ""] + _targets(data) + [""]
    dense = rows.get(DENSE_WT2)
    if dense:
        out += [f"Dense SmolLM2-135M: WikiText-2 {_fmt(_ppl(dense))} (first windows), {_fmt(_ppl(dense, full=True))} "
                f"(full test); GSM8K {_fmt(_ppl(dense, 'gsm8k'))}.", ""]
    out += ["## WikiText-2 perplexity (first windows) and prune time, SmolLM2-135M, uniform allocation", ""]
    out += _grid(data, "wikitext2") + [""]
    out += ["## Held-out domain: GSM8K test perplexity (first 20 windows)", ""] + _grid(data, "gsm8k") + [""]
    out += ["## Every SmolLM2 row", ""]
    out += _list(data, "smol/", ["WikiText-2", "GSM8K", "full WT2", "prune s", "block step s", "sparsity", "params",
                                 "peak MB"]) + [""]
    structured = _structured(data)
    if structured:
        out += ["## Structured 25 %: what reconstruction gains without training", ""] + structured + [""]
        out += _list(data, "smol32/", ["WikiText-2", "GSM8K", "prune s", "block step s", "sparsity", "params",
                                       "peak MB"]) + [""]
    if any(k.startswith("tune/") for k in rows):
        out += ["## Choosing the reconstruction's learning rate and inputs (WikiText-2 *validation*, 32 x 1024 "
                "calibration)", ""]
        out += _list(data, "tune/", ["WT2 valid", "prune s", "block step s", "sparsity"]) + [""]
    if any(k.startswith("qwen") for k in rows):
        out += ["## Qwen2.5-Coder-1.5B, streamed (`--offload disk`), calibration 16 x 1024 (`qwen64/`: 64 x 1024), "
                "WikiText-2 first 16 windows, GSM8K first 8", ""]
        out += _list(data, "qwen", ["WikiText-2", "GSM8K", "prune s", "block step s", "sparsity", "peak MB"]) + [""]
    tasks = _tasks(data)
    if tasks:
        out += ["## Tasks (first 500 examples; '(tie)': within two combined standard errors of the dense model)", ""]
        out += tasks + [""]
    out += ["## Runs", ""]
    out += [f"- `{r['command']}` — {r['when']}, load {r['load']:.2f}" for r in data.get("runs", [])]
    return "\n".join(out) + "\n"
