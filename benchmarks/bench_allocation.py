"""Uniform vs AlphaPruning vs OWL layerwise allocation on SmolLM2-135M (WikiText-2 perplexity).

For each method (Wanda, SparseGPT) and sparsity (60%, 70%, unstructured), prune the dense
model once per allocation — uniform, AlphaPruning over a small ε grid, OWL over a small λ grid
— and measure WikiText-2 perplexity on the first windows of the test set. The dense weights are
restored from memory between runs.

    flock /tmp/prunekit-heavy.lock python benchmarks/bench_allocation.py

Writes ``benchmarks/results/allocation.{md,json}`` (rewritten after every run, so a partial
sweep is kept).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from common import save_json

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.6, 0.7])
    ap.add_argument("--epsilons", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--lambdas", nargs="+", type=float, default=[0.02, 0.04, 0.08])
    ap.add_argument("--calib", default="austen")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS / "allocation"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import prunekit
    from prunekit import CalibConfig, EvalConfig, PruneConfig
    from prunekit.data import calibration_ids
    from prunekit.report import environment

    model, tok = prunekit.load_model(args.model, args.dtype)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib_cfg = CalibConfig(args.calib, args.nsamples, args.seqlen, seed=0, batch_size=8)
    ids = calibration_ids(calib_cfg, tok)
    ev_cfg = EvalConfig(("wikitext2",), args.eval_seqlen, args.max_windows)
    t0 = time.perf_counter()
    dense = prunekit.evaluate(model, tok, ev_cfg)["wikitext2"]
    settings = {
        "model": args.model, "dtype": args.dtype, "calibration": f"{args.calib}, {args.nsamples} x {args.seqlen} tokens, seed 0",
        "eval": f"WikiText-2 test, first {args.max_windows} windows of {args.eval_seqlen} tokens ({dense.tokens} tokens)",
        "alpha": "metric alpha_peak, block-wise mapping", "owl": "M = 5, Wanda scores on the dense model",
    }
    import sys

    result = {"argv": sys.argv[1:], "settings": settings, "dense_ppl": dense.ppl, "dense_eval_s": time.perf_counter() - t0, "runs": [],
              "environment": environment()}

    grid = [("uniform", {})] + [("alpha", {"epsilon": e}) for e in args.epsilons] + [("owl", {"lam": lam}) for lam in args.lambdas]
    for method in args.methods:
        for s in args.sparsities:
            for alloc, opts in grid:
                model.load_state_dict(dense_state)
                cfg = PruneConfig(method=method, sparsity=s, allocation=alloc, allocation_options=opts, calib=calib_cfg)
                t0 = time.perf_counter()
                rep = prunekit.prune(model, cfg, calib=ids)
                t_prune = time.perf_counter() - t0
                ppl = prunekit.evaluate(model, tok, ev_cfg)["wikitext2"].ppl
                a = rep.extra["allocation"]
                run = {"method": method, "sparsity": s, "allocation": alloc, "options": opts, "ppl": ppl,
                       "achieved_sparsity": rep.sparsity, "allocated_mean": a["achieved_mean"],
                       "min_layer": a["min"], "max_layer": a["max"], "per_block": a["per_block"],
                       "prune_s": t_prune, "total_s": time.perf_counter() - t0}
                result["runs"].append(run)
                print(f"{method} {s:.0%} {alloc} {opts}: ppl {ppl:.3f} (sparsity {rep.sparsity:.4f}, "
                      f"layers {a['min']:.3f}-{a['max']:.3f}) {run['total_s']:.0f}s", flush=True)
                write(args.out, result)


def _label(r: dict) -> str:
    if r["allocation"] == "alpha":
        return f"alpha ε={r['options']['epsilon']:g}"
    if r["allocation"] == "owl":
        return f"owl λ={r['options']['lam']:g}"
    return "uniform"


def write(out: str, result: dict) -> None:
    path = Path(out)
    save_json(path.with_suffix(".json"), result)
    st, env = result["settings"], result["environment"]
    lines = [
        f"# Layerwise allocation on {st['model']}: WikiText-2 perplexity",
        "",
        f"Command: `PRUNEKIT_DATA=../shared/data python benchmarks/bench_allocation.py {' '.join(result.get('argv', []))}`",
        "",
        f"- dtype {st['dtype']}; calibration {st['calibration']}; {st['eval']}",
        f"- AlphaPruning: {st['alpha']}; OWL: {st['owl']}; all unstructured, sequential engine",
        f"- dense perplexity {result['dense_ppl']:.3f}",
        f"- machine: {env['processor']}, {env['threads']} threads, torch {env['torch']}, transformers {env['transformers']}",
        "",
        "- allocated mean: the parameter-weighted mean of the per-layer targets the allocator returned "
        "(must equal the target to 1e-4); achieved: zeros / weights after pruning. They differ because a "
        "per-row criterion prunes int(columns x s) weights per row (Wanda's rule: 345 of 576 at 60%), and "
        "SparseGPT's reference rule prunes one weight more per 128-column block.",
        "",
        "| method | sparsity | allocation | ppl | vs uniform | allocated mean | achieved sparsity | layer range | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    uni = {(r["method"], r["sparsity"]): r["ppl"] for r in result["runs"] if r["allocation"] == "uniform"}
    for r in result["runs"]:
        u = uni.get((r["method"], r["sparsity"]))
        delta = f"{(r['ppl'] / u - 1) * 100:+.1f}%" if u and r["allocation"] != "uniform" else ""
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {_label(r)} | {r['ppl']:.3f} | {delta} | "
                     f"{r['allocated_mean']:.6f} | {r['achieved_sparsity']:.4f} | {r['min_layer']:.3f}–{r['max_layer']:.3f} | {r['total_s']:.0f} |")
    best = {}
    for r in result["runs"]:
        key = (r["method"], r["sparsity"], r["allocation"])
        if key not in best or r["ppl"] < best[key]["ppl"]:
            best[key] = r
    lines += ["", "Best setting of each allocation (lower is better):", "",
              "| method | sparsity | uniform | best alpha | best owl |", "|---|---|---|---|---|"]
    for (m, s), u in uni.items():
        cells = []
        for alloc in ("alpha", "owl"):
            b = best.get((m, s, alloc))
            cells.append(f"{b['ppl']:.3f} ({_label(b)})" if b else "-")
        lines.append(f"| {m} | {s:.0%} | {u:.3f} | {cells[0]} | {cells[1]} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
