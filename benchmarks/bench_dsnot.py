"""DSnoT after Wanda on SmolLM2-135M: WikiText-2 perplexity before/after and DSnoT's run time.

Every row is its own sequential prune (the refined model propagates its own refined
activations, as in the reference), on the same calibration ids.

    flock /tmp/prunekit-heavy.lock python benchmarks/bench_dsnot.py

Writes ``benchmarks/results/dsnot.json`` and ``dsnot.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import prunekit
from prunekit import CalibConfig, PruneConfig
from prunekit.data import calibration_ids
from prunekit.eval import perplexity
from prunekit.report import environment

from common import save_json

RESULTS = Path(__file__).resolve().parent / "results"
os.environ.setdefault("PRUNEKIT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

OLD_MACHINE = "Intel(R) Xeon(R) Processor @ 2.80GHz, 1 threads"  # rows measured before rows named their machine
REFINES = [  # (label, refine options); None = Wanda alone
    ("wanda", None),
    ("+ dsnot (reference defaults: attention only, skip=mlp)", {}),
    ("+ dsnot (all linears, skip='')", {"skip": ""}),
    # variants beyond the reference (run with --variants 3 4 5 --merge)
    ("+ dsnot (attention only, monotone)", {"monotone": True}),
    ("+ dsnot (all linears, monotone)", {"skip": "", "monotone": True}),
    ("+ dsnot (attention only, max_cycles 7 ≈ 50·576/4096)", {"max_cycles": 7}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.6, 0.7])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", default="austen")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=10)
    ap.add_argument("--variants", type=int, nargs="+", default=[0, 1, 2],
                    help="indices into REFINES (default: Wanda, the reference defaults, all linears)")
    ap.add_argument("--merge", action="store_true", help="keep the rows already in results/dsnot.json")
    args = ap.parse_args()

    model, tok = prunekit.load_model("smollm2-135m", args.dtype)
    calib_cfg = CalibConfig(dataset=args.calib, nsamples=args.nsamples, seqlen=args.seqlen)
    ids = calibration_ids(calib_cfg, tok)
    dense = perplexity(model, tok, "wikitext2", args.eval_seqlen, args.max_windows)
    print(f"dense ppl {dense.ppl:.3f}")
    del model
    env = environment()
    rows = json.loads((RESULTS / "dsnot.json").read_text())["rows"] if args.merge else []
    chosen = [REFINES[i] for i in args.variants]
    # most important rows first (Wanda vs Wanda+DSnoT at each sparsity), extra variants after
    jobs = [(s, lab, o) for s in args.sparsities for lab, o in chosen[:2]]
    jobs += [(s, lab, o) for lab, o in chosen[2:] for s in args.sparsities]
    for s, label, opts in jobs:
        if any(r["sparsity"] == s and r["label"] == label for r in rows):
            continue  # already measured (--merge)
        model, tok = prunekit.load_model("smollm2-135m", args.dtype)
        cfg = PruneConfig(method="wanda", sparsity=s, calib=calib_cfg, refine=None if opts is None else "dsnot",
                          refine_options=opts or {})
        t0 = time.perf_counter()
        rep = prunekit.prune(model, cfg, calib=ids)
        secs = time.perf_counter() - t0
        ref = [r.info.get("refine", {}) for r in rep.layers]
        done = [r for r in ref if "swaps" in r]
        res = perplexity(model, tok, "wikitext2", args.eval_seqlen, args.max_windows)
        row = {"sparsity": s, "label": label, "refine_options": opts, "ppl": res.ppl, "achieved_sparsity": rep.sparsity,
               "prune_s": secs, "dsnot_s": sum(r.get("seconds", 0.0) for r in done),
               "refined_layers": len(done), "swaps": sum(r["swaps"] for r in done),
               "mean_cycles": sum(r["cycles"] for r in done) / len(done) if done else 0,
               "mean_abs_e_before": sum(r["mean_abs_error_before"] for r in done) / len(done) if done else None,
               "mean_abs_e_after": sum(r["mean_abs_error_after"] for r in done) / len(done) if done else None,
               "machine": f"{env.get('processor')}, {env.get('threads')} threads"}
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
        write(rows, args, dense.ppl)  # after every row: partial results survive an interruption
        del model
        gc.collect()


def write(rows: list[dict], args, dense_ppl: float) -> None:
    settings = {"model": "smollm2-135m", "dtype": args.dtype, "calibration": f"{args.calib}, {args.nsamples} x "
                f"{args.seqlen} tokens, seed 0 (same ids for every row)", "ppl": f"WikiText-2 test, first "
                f"{args.max_windows} windows of {args.eval_seqlen} tokens", "dense_ppl": dense_ppl,
                "dsnot defaults": "max_cycles 50, update_threshold 0.1/2048 per token, pow_of_var 1",
                "command": "python benchmarks/bench_dsnot.py" + (
                    f" --variants {' '.join(map(str, args.variants))} --merge" if args.merge else "")}
    env = environment()
    save_json(RESULTS / "dsnot.json", {"environment": env, "settings": settings, "rows": rows}, indent=2)
    out = ["# DSnoT after Wanda on SmolLM2-135M (measured)", ""]
    out += [f"- {k}: {v}" for k, v in settings.items()]
    out += [f"- versions: torch {env.get('torch')}, transformers {env.get('transformers')}; machine per row (times "
            "compare only within one machine; perplexities are float32 and machine-independent to ~1e-4)", ""]
    out += ["| sparsity | variant | wiki2 ppl | refined linears | swaps | mean cycles | mean abs e (before → after) "
            "| DSnoT s | prune s (total) | machine |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = (f"{r['mean_abs_e_before']:.2e} → {r['mean_abs_e_after']:.2e}" if r["mean_abs_e_before"] is not None else "-")
        out.append(f"| {r['sparsity']:.0%} | {r['label']} | {r['ppl']:.2f} | {r['refined_layers']} | {r['swaps']} | "
                   f"{r['mean_cycles']:.1f} | {e} | {r['dsnot_s']:.1f} | {r['prune_s']:.1f} | "
                   f"{r.get('machine', OLD_MACHINE)} |")
    (RESULTS / "dsnot.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
