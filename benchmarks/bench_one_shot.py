"""One-shot quality at high sparsity: block reconstruction, SparseSwaps, ALPS, RIA against Wanda/SparseGPT.

Every row prunes SmolLM2-135M (in memory) or Qwen2.5-Coder-1.5B (streamed from disk, ``--offload
disk``'s path) with the same calibration ids (Austen, seed 0; 128 x 1024 tokens unless the row says
otherwise), records the prune time, saves the pruned model (prunekit's compressed format) under the
cache folder and measures it: WikiText-2 test perplexity on the first ``--windows`` windows of 1024
tokens (the core.md protocol), a held-out domain (GSM8K test problems, first ``--heldout-windows``
windows of 1024). ``--full`` adds the whole WikiText-2 test split and PIQA / BoolQ on the first 500
examples (acc ± stderr) for the rows given; ``--tasks`` the tasks alone. Results go to ``benchmarks/results/one_shot.json`` after
every step (rows already measured are skipped: resumable by row) and are rendered to
``one_shot.md``. Heavy: run one row (or a few) per invocation under the shared lock::

    OMP_WAIT_POLICY=PASSIVE /work/bin/heavy --tag oneshot python benchmarks/bench_one_shot.py --rows smol/sparsegpt/70
    python benchmarks/bench_one_shot.py --list          # every row id
    python benchmarks/bench_one_shot.py --render        # only re-render the Markdown
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from one_shot_rows import MODELS, ROWS, Row  # noqa: E402
from one_shot_render import render  # noqa: E402
from common import cpu_flags, load_json, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
JSON = RESULTS / "one_shot.json"
os.environ.setdefault("PRUNEKIT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
CACHE = Path(os.environ.get("ONESHOT_CACHE", Path.home() / ".cache" / "prunekit" / "bench-one-shot"))
TASKS = ("piqa", "boolq")


def load_results() -> dict:
    return load_json(JSON, {"rows": {}, "runs": []})


def save_results(data: dict) -> None:
    write_results(JSON.with_suffix(""), data, render)


def machine() -> dict:
    from prunekit.report import environment

    env, flags = environment(), cpu_flags()
    return {"processor": env.get("processor"), "threads": torch.get_num_threads(),
            "cpu_flags": " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags),
            "torch": env.get("torch"), "transformers": env.get("transformers"), "prunekit": env.get("prunekit")}


def calib_ids(model: str, row: Row, tok):
    from prunekit import CalibConfig
    from prunekit.data import calibration_ids

    ids = calibration_ids(CalibConfig(dataset="austen", nsamples=row.nsamples, seqlen=row.seqlen, seed=0), tok)
    return ids, hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def folder(row_id: str) -> Path:
    return CACHE / row_id.replace("/", "__")


def prune_row(row_id: str, row: Row) -> dict:
    """Prune (in memory or streamed), save to the cache; the row's prune facts."""
    import prunekit
    from prunekit.formats import save_folder
    from prunekit.masks import Pattern

    cfg = row.config()
    out = folder(row_id)
    # the compressed format stores zeros compactly; a structurally pruned model has none (smaller shapes)
    fmt = "dense" if Pattern.parse(cfg.pattern).is_structured else "compressed"
    t0 = time.perf_counter()
    if row.streamed:
        from prunekit.streaming import open_lazy, prune_streamed
        import shutil

        lazy, tok = open_lazy(MODELS[row.model])
        ids, digest = calib_ids(row.model, row, tok)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rep = prune_streamed(lazy, cfg, out, tok, calib=ids, save_format=fmt)
        tok.save_pretrained(out)
        from prunekit.formats import REPORT_FILE

        (out / REPORT_FILE).write_text(rep.to_json())
    else:
        model, tok = prunekit.load_model(MODELS[row.model])
        ids, digest = calib_ids(row.model, row, tok)
        rep = prunekit.prune(model, cfg, calib=ids)
        save_folder(model, tok, out, rep.to_dict(), overwrite=True, save_format=fmt)
        del model
    secs = time.perf_counter() - t0
    steps = [b.info for b in rep.blocks if b.info]
    return {"prune_s": rep.seconds, "wall_s": secs, "sparsity": rep.sparsity, "calib_sha": digest,
            "calibration": f"austen {row.nsamples}x{row.seqlen} seed 0", "peak_rss_mb": rep.peak_rss_mb,
            "block_step_s": sum(s.get("seconds", 0.0) for s in steps), "block_steps": _step_summary(steps),
            "layer_refine_s": sum(r.info.get("refine", {}).get("seconds", 0.0) for r in rep.layers),
            "structure": rep.extra.get("structure", {}).get("params"), "refine_resolved": _resolved(row)}


def _resolved(row: Row) -> dict | None:
    """Every option of the row's refiner, defaults included (a row that says ``{}`` ran with these)."""
    import dataclasses

    from prunekit.registry import REFINERS

    return dataclasses.asdict(REFINERS.get(row.refine).Options.parse(row.refine_opts)) if row.refine else None


def _step_summary(steps: list[dict]) -> dict:
    if not steps:
        return {}
    keys = ("loss_first_epoch", "loss_last_epoch", "heldout_before", "heldout_after", "reverted")
    return {k: [s.get(k) for s in steps] for k in keys if any(k in s for s in steps)} | {"steps": steps[0].get("steps")}


def load_pruned(row_id: str, row: Row):
    """The saved model: in memory (SmolLM2) or lazily, one block at a time (a streamed row)."""
    import prunekit

    if row.dense and not row.streamed:
        return prunekit.load_model(MODELS[row.base])
    if row.streamed:
        from prunekit.streaming import open_lazy

        lazy, tok = open_lazy(MODELS[row.base] if row.dense else str(folder(row_id)))
        return lazy.model, tok
    return prunekit.load_model(str(folder(row_id)))


def measure_ppl(model, tok, text: str, windows: int | None, heldout: int | None) -> dict:
    from prunekit.eval import perplexity

    out = {}
    wt = perplexity(model, tok, text, 1024, windows)
    out[text] = {"ppl": wt.ppl, "windows": wt.windows, "tokens": wt.tokens, "seconds": wt.seconds}
    if heldout:
        gs = perplexity(model, tok, "gsm8k", 1024, heldout)
        out["gsm8k"] = {"ppl": gs.ppl, "windows": gs.windows, "tokens": gs.tokens, "seconds": gs.seconds}
    return out


def measure_tasks(model, tok, limit: int) -> dict:
    from prunekit.eval.tasks import TaskSettings, prepare_tasks, run_tasks

    res = run_tasks(model, tok, prepare_tasks(list(TASKS)), TaskSettings(limit=limit))
    return {k: {"metrics": r.metrics, "stderr": r.stderr, "n": r.n, "seconds": r.seconds} for k, r in res.items()}


def run_row(data: dict, row_id: str, args) -> None:
    row = ROWS[row_id]
    rec = data["rows"].setdefault(row_id, {"spec": row.to_dict()})
    rec["spec"] = row.to_dict()
    load = os.getloadavg()[0]
    if "prune" not in rec and not row.dense:
        print(f"[{row_id}] pruning ...", flush=True)
        rec["prune"] = prune_row(row_id, row) | {"machine": machine(), "load_before": load,
                                                 "load_after": os.getloadavg()[0], "when": time.strftime("%F %T")}
        save_results(data)
        gc.collect()
    if args.only_prune:
        return
    windows = row.windows if row.windows is not None else args.windows
    heldout = row.heldout if row.heldout is not None else args.heldout_windows
    key = f"ppl@{windows}"
    if key not in rec:
        print(f"[{row_id}] perplexity ({windows} windows) ...", flush=True)
        model, tok = load_pruned(row_id, row)
        rec[key] = measure_ppl(model, tok, row.eval_text, windows, heldout) | {"machine": machine(), "load": load,
                                                                "when": time.strftime("%F %T")}
        save_results(data)
        del model
        gc.collect()
    if args.tasks and "tasks" not in rec and "full" not in rec:
        print(f"[{row_id}] tasks ...", flush=True)
        model, tok = load_pruned(row_id, row)
        rec["tasks"] = {"tasks": measure_tasks(model, tok, args.task_limit), "machine": machine(), "load": load,
                        "when": time.strftime("%F %T")}
        save_results(data)
        del model
        gc.collect()
    if args.full and "full" not in rec:
        print(f"[{row_id}] full WikiText-2 test and tasks ...", flush=True)
        model, tok = load_pruned(row_id, row)
        full = measure_ppl(model, tok, "wikitext2", None, None)
        full["tasks"] = measure_tasks(model, tok, args.task_limit)
        rec["full"] = full | {"machine": machine(), "load": load, "when": time.strftime("%F %T")}
        save_results(data)
        del model
        gc.collect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=[], help="row ids to run (see --list)")
    ap.add_argument("--list", action="store_true", help="print the row ids and exit")
    ap.add_argument("--render", action="store_true", help="only re-render one_shot.md from one_shot.json")
    ap.add_argument("--windows", type=int, default=40, help="WikiText-2 test windows of 1024 for the grid")
    ap.add_argument("--heldout-windows", type=int, default=20, help="GSM8K test windows of 1024")
    ap.add_argument("--full", action="store_true", help="also the full WikiText-2 test and the tasks")
    ap.add_argument("--tasks", action="store_true", help="also the tasks (without the full test split)")
    ap.add_argument("--task-limit", type=int, default=500)
    ap.add_argument("--redo", action="store_true", help="forget the given rows' results first")
    ap.add_argument("--only-prune", action="store_true", help="prune and save only (measure in a later run)")
    args = ap.parse_args()
    if args.list:
        for k, r in ROWS.items():
            print(k, "-", r.describe())
        return 0
    data = load_results()
    if args.render:
        save_results(data)
        return 0
    torch.set_num_threads(2)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        print(f"unknown rows: {unknown}; see --list", file=sys.stderr)
        return 2
    data["runs"].append({"command": "python benchmarks/bench_one_shot.py " + " ".join(sys.argv[1:]),
                         "when": time.strftime("%F %T"), "machine": machine(), "load": os.getloadavg()[0]})
    for row_id in args.rows:
        if args.redo:
            data["rows"].pop(row_id, None)
        run_row(data, row_id, args)
    save_results(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
