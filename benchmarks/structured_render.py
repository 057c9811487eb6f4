"""Markdown for benchmarks/results/structured.md from the rows bench_structured.py recorded."""

from __future__ import annotations

from prunekit.eval.ties import mark

DTYPES = ("float32", "bfloat16")
LOWRANK_DEFAULTS = {("budget", "params"), ("objective", "params")}  # the benchmark's own low-rank settings


def _speed(row: dict, dense: dict, dtype: str, what: str) -> str:
    sp = row.get("speed", {}).get(dtype)
    if not sp:
        return "-"
    s = dense[dtype][what] / sp[what]
    mark = ("†" if row.get("speed_shared_with") else "") + ("" if "dense_speed_paired" in row else "*")
    return f"{s:.2f}x{mark} ({sp[what]:.0f})" if what == "prefill_ms" else f"{s:.2f}x{mark} ({sp[what]:.1f})"


def _task(row: dict, name: str, dense: dict | None = None) -> str:
    """``acc ± stderr``, marked against dense (≈ tie inside 2 stderr of the difference, ↑ / ↓ clearly not)."""
    t = (row.get("tasks") or {}).get(name)
    if not t or t.get("acc") is None:
        return "-"
    d = (dense.get("tasks") or {}).get(name) if dense is not None and dense is not row else None
    text = mark(t["acc"], t["stderr"], d["acc"] if d else None, d["stderr"] if d else None)
    return text.replace("±", " ± ", 1)


def _fmt_ppl(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2f}" if p < 1e4 else f"{p:.3g}"


def _what(row: dict) -> str:
    if row["family"] == "dense":
        return "dense"
    if row["family"] == "lowrank":
        return f"low rank {row['method']}"
    if row["family"] == "unstructured":
        return f"unstructured {row['method']} (zeros stored dense)"
    return f"{row['pattern']} {row['method']}{_opts(row)} {row['allocation']}"


def _opts(row: dict) -> str:
    """The row's method options as `` k=v`` (the benchmark's own low-rank budget settings left out)."""
    return "".join(f" {k}={v}" for k, v in (row.get("options") or {}).items() if (k, v) not in LOWRANK_DEFAULTS)


def _format(row: dict) -> str:
    f = row.get("format", "")
    if f.startswith("plain Hugging Face") or f.startswith("plain safetensors"):
        return "HF"
    if f.startswith("prunekit structured"):
        return "prunekit"
    if f.startswith("factorized"):
        return "prunekit low-rank"
    return f[:12]


def _dense(row: dict, runs: list[dict]) -> dict:
    """The dense timing a row is compared with: interleaved with the row's own timing where it was
    (``dense_speed_paired``), else the run's start-of-run measurement."""
    return row.get("dense_speed_paired") or runs[row.get("run", -1)]["dense_speed"]


def table(rows: list[dict], runs: list[dict]) -> list[str]:
    out = ["| row | run | target | removed | params (M) | folder MB (loader) | wiki2 ppl | piqa acc | boolq acc | "
           "bound | prefill fp32 (ms) | decode fp32 (ms/tok) | prefill bf16 (ms) | decode bf16 (ms/tok) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = next((r for r in rows if r["family"] == "dense"), None)
    for r in rows:
        dense = _dense(r, runs)
        target = f"{r['sparsity']:.0%}" if r.get("sparsity") is not None else "-"
        removed = f"{r['removed_of_linear']:.3f}" if r.get("removed_of_linear") is not None else "0"
        out.append(f"| {_what(r)} | {r.get('run', '-')} | {target} | {removed} | {r['params'] / 1e6:.2f} | "
                   f"{r['folder_mb']:.0f} ({_format(r)}) | {_fmt_ppl(r.get('ppl'))} | {_task(r, 'piqa', ref)} | "
                   f"{_task(r, 'boolq', ref)} | "
                   f"{r['bound']:.3f}x | {_speed(r, dense, 'float32', 'prefill_ms')} | "
                   f"{_speed(r, dense, 'float32', 'decode_ms')} | {_speed(r, dense, 'bfloat16', 'prefill_ms')} | "
                   f"{_speed(r, dense, 'bfloat16', 'decode_ms')} |")
    return out


def _order(r: dict) -> tuple:
    fam = {"dense": 0, "structured": 1, "lowrank": 2, "unstructured": 3}[r["family"]]
    pat = ["channels", "width", "heads", "ffn", "blocks", "unstructured"].index(r.get("pattern", "unstructured")) \
        if r.get("pattern") else 0
    return (r.get("sparsity") or 0.0, fam, pat, r.get("method", ""), r.get("allocation", ""))


def _best(rows: list[dict], family: str) -> dict | None:
    """The lowest-perplexity row of ``family`` (None when there is none)."""
    return min((r for r in rows if r["family"] == family), key=lambda r: r["ppl"], default=None)


def targets(rows: list[dict], runs: list[dict]) -> list[str]:
    at = [r for r in rows if r.get("sparsity") == 0.25]
    if not at:
        return []
    out = ["## Targets at 25% of the decoder-linear weights removed", "",
           "Speed target: s - 1 >= 0.9 (bound - 1) for prefill and decode (fp32; bf16 shown too). "
           "Quality target: the best one-shot structured perplexity at least 10x below low rank's.", "",
           "| row | bound | needed | prefill fp32 | decode fp32 | prefill bf16 | decode bf16 | met (fp32) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in at:
        if r["family"] not in ("structured",) or "speed" not in r:
            continue
        dense = _dense(r, runs)
        need = 1 + 0.9 * (r["bound"] - 1)
        s = {(d, w): dense[d][w] / r["speed"][d][w] for d in DTYPES for w in ("prefill_ms", "decode_ms")}
        met = s[("float32", "prefill_ms")] >= need and s[("float32", "decode_ms")] >= need
        out.append(f"| {_what(r)} | {r['bound']:.3f}x | {need:.3f}x | {s[('float32', 'prefill_ms')]:.3f}x | "
                   f"{s[('float32', 'decode_ms')]:.3f}x | {s[('bfloat16', 'prefill_ms')]:.3f}x | "
                   f"{s[('bfloat16', 'decode_ms')]:.3f}x | {'yes' if met else 'NO'} |")
    best, low = _best(at, "structured"), _best(at, "lowrank")
    if best and low:
        ratio = low["ppl"] / best["ppl"]
        out += ["", f"Best structured: {_what(best)}, ppl {best['ppl']:.2f} at {best['params'] / 1e6:.2f}M params; best "
                f"low rank: {_what(low)}, ppl {_fmt_ppl(low['ppl'])} at {low['params'] / 1e6:.2f}M: "
                f"{ratio:.1f}x lower perplexity ({'met' if ratio >= 10 else 'NOT met'}: target >= 10x)."]
    return out + [""]


def _cell(row: dict | None) -> str:
    return "-" if row is None else _fmt_ppl(row.get("ppl"))


def matrix(rows: list[dict]) -> list[str]:
    """Perplexity per target: every pattern x criterion, uniform beside the best non-uniform allocation,
    with low rank and unstructured at the same target below, and the structured / low-rank ratio."""
    out = ["## Criterion x allocation at each target (WikiText-2 perplexity)", ""]
    for t in sorted({r["sparsity"] for r in rows if r.get("sparsity") is not None}):
        at = [r for r in rows if r.get("sparsity") == t]
        out += [f"### {t:.0%} of the decoder-linear weights", "",
                "| pattern | criterion | uniform | best non-uniform (allocation) |", "|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = {}
        for r in at:  # a criterion with options (slimgpt bias=true) is a criterion of its own
            groups.setdefault((r["pattern"], r["method"] + _opts(r), r["family"]), []).append(r)
        for (pat, method, fam), same in groups.items():
            uni = next((r for r in same if r["allocation"] == "uniform"), None)
            non = min((r for r in same if r["allocation"] != "uniform"), key=lambda r: r["ppl"], default=None)
            name = {"lowrank": "low rank", "unstructured": "unstructured (zeros stored)"}.get(fam, pat)
            non_s = f"{_cell(non)} ({non['allocation']})" if non else "-"
            out.append(f"| {name} | {method} | {_cell(uni)} | {non_s} |")
        best, low = _best(at, "structured"), _best(at, "lowrank")
        if best and low:
            out += ["", f"Best structured: {_what(best)} ({_fmt_ppl(best['ppl'])}); best low rank: {_what(low)} "
                    f"({_fmt_ppl(low['ppl'])}): {low['ppl'] / best['ppl']:.1f}x lower perplexity."]
        out.append("")
    return out


def render(data: dict) -> str:
    rows = sorted(data["rows"], key=_order)
    out = ["# Structured compression of SmolLM2-135M (measured)", ""]
    out += [f"- {k}: {v}" for k, v in data.get("settings", {}).items()]
    out += ["- removed: fraction of the decoder-linear weights removed (unstructured: set to zero but still stored); "
            "params: every parameter of the model as it runs (tied embeddings once, biases included); bound: dense "
            "params / params, what a smaller model can at most gain",
            "- speed: dense time / row time, measured in the same process as the row, the dense model's repetitions "
            "interleaved with the row's (A B, B A, ...) so that drift cancels; milliseconds in brackets; † = "
            "identical tensor shapes to an earlier row of the same run, whose measurement is reused; * = measured "
            "before interleaving: compared with the dense timing at the start of its run (which drifted by up to "
            "10 % by the end of a run, see Runs)",
            "- piqa / boolq: accuracy ± one standard error, marked against dense: ≈ a tie (the difference is inside "
            "two standard errors of the difference), ↑ / ↓ a real difference. Dense SmolLM2 answers BoolQ ' no' almost "
            "always (below chance, docs/evaluation.md): a ↑ there means the pruned model lost that bias", ""]
    out += ["## Runs", ""]
    for i, r in enumerate(data.get("runs", [])):
        env = r["environment"]
        d0, d1 = r["dense_speed"], r.get("dense_speed_end")
        end = (f"; at the end {d1['float32']['prefill_ms']:.0f} / {d1['float32']['decode_ms']:.1f} (fp32), "
               f"{d1['bfloat16']['prefill_ms']:.0f} / {d1['bfloat16']['decode_ms']:.1f} (bf16)") if d1 else ""
        out.append(f"{i}. `{r['command']}` — {r['started']}, {env.get('processor')}, {env.get('threads')} threads, "
                   f"torch {env.get('torch')}, transformers {env.get('transformers')}, prunekit {env.get('prunekit')}; "
                   f"load {r.get('loadavg_start', 0):.2f}; dense prefill / decode ms: "
                   f"{d0['float32']['prefill_ms']:.0f} / {d0['float32']['decode_ms']:.1f} (fp32), "
                   f"{d0['bfloat16']['prefill_ms']:.0f} / {d0['bfloat16']['decode_ms']:.1f} (bf16){end}"
                   + (f". Note: {r['note']}" if r.get("note") else ""))
    out += ["", "## All rows", ""] + table(rows, data.get("runs", [])) + [""]
    out += targets(rows, data.get("runs", []))
    out += matrix(rows)
    return "\n".join(out) + "\n"
