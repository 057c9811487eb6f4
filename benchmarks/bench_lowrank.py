"""Low-rank compression of SmolLM2-135M: parameters saved, WikiText-2 perplexity, real CPU latency.

A compressed model that is not faster or smaller is not compressed: for every variant this
measures the parameters actually stored, the saved folder's size, prefill latency (one
sequence of ``--prefill`` tokens) and per-token decode latency with a KV cache, against the
dense model, in the same process and dtype.

Run under the shared lock (it runs the real model for a few minutes)::

    flock /tmp/prunekit-heavy.lock python benchmarks/bench_lowrank.py

Writes ``benchmarks/results/lowrank.json`` and ``lowrank.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import prunekit
from prunekit import CalibConfig, PruneConfig
from prunekit.data import calibration_ids
from prunekit.eval import perplexity
from prunekit.formats import save_compressed
from prunekit.models import decoder_linears
from prunekit.report import environment

from common import folder_mb, seconds, write_results

RESULTS = Path(__file__).resolve().parent / "results"
os.environ.setdefault("PRUNEKIT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

VARIANTS = [  # (label, method, rank/param reduction, method options)
    ("dense", None, 0.0, {}),
    ("welore 30% rank", "welore", 0.3, {}),
    ("welore 50% rank", "welore", 0.5, {}),
    ("welore 30% params", "welore", 0.3, {"objective": "params"}),
    ("svd 30% params (uniform)", "svd", 0.3, {"budget": "params"}),
    ("svd-llm 30% params (uniform, whitened)", "svd-llm", 0.3, {"budget": "params"}),
    # the reference's perplexity protocol: every matrix truncated at tau, saving or not
    ("welore 30% rank, N-LRCs truncated (reference protocol)", "welore", 0.3, {"n_lrc": "truncate"}),
]


def linear_params(model) -> int:
    """Weights stored by the decoder's linears (a LowRankLinear's two factor linears are among them)."""
    return sum(m.weight.numel() for m in decoder_linears(model).values())


@torch.inference_mode()
def latency(model, vocab: int, prefill: int, decode: int, repeats: int) -> dict:
    """Median wall time of a ``prefill``-token forward and of one decode step with a KV cache (batch 1).

    One full prefill and one decode run first, untimed, so allocator and kernel warm-up is not
    charged to whichever variant happens to run first."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prefill), generator=g)
    prompt = ids[:, :64]

    from prunekit.eval.tasks.lm import _cache_arg, cache_of

    key = _cache_arg(model)  # "cache" on transformers >= 5.2x ("past_key_values" is deprecated there)

    def decode_run() -> float:
        out = model(prompt, use_cache=True)
        pkv, nxt = cache_of(out), out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode):
            out = model(nxt, use_cache=True, **{key: pkv})
            pkv, nxt = cache_of(out), out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / decode

    model(ids, use_cache=False)  # warm-up
    decode_run()
    pre = [seconds(lambda: model(ids, use_cache=False)) for _ in range(repeats)]
    dec = [decode_run() for _ in range(repeats)]
    return {"prefill_ms": 1000 * statistics.median(pre), "prefill_tokens": prefill,
            "decode_ms_per_token": 1000 * statistics.median(dec), "decode_tokens": decode, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=10)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default all)")
    ap.add_argument("--merge", action="store_true", help="keep the rows already in results/lowrank.json")
    args = ap.parse_args()

    rows = json.loads((RESULTS / "lowrank.json").read_text())["rows"] if args.merge else []
    calib = None
    for label, method, amount, opts in VARIANTS:
        if (args.only and label not in args.only) or any(r["label"] == label for r in rows):
            continue
        model, tok = prunekit.load_model("smollm2-135m", args.dtype)
        row: dict = {"label": label, "method": method or "dense", "target": amount, "options": opts}
        dense_params = linear_params(model)
        if method:
            cfg = PruneConfig(method=method, sparsity=amount, method_options=opts,
                              calib=CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen))
            if method == "svd-llm" and calib is None:
                calib = calibration_ids(cfg.calib, tok)
            t0 = time.perf_counter()
            rep = prunekit.prune(model, cfg, calib=calib if method == "svd-llm" else None)
            row["compress_s"] = time.perf_counter() - t0
            row["summary"] = rep.extra.get("method_summary", {})
            lr = [r for r in rep.layers if r.info.get("lowrank")]
            row["lowrank_matrices"] = len(lr)
            row["dense_matrices"] = len(rep.layers) - len(lr)
            by_kind: dict = {}
            for r in rep.layers:
                kind = r.name.rsplit(".", 1)[-1]
                d = by_kind.setdefault(kind, {"lowrank": 0, "dense": 0, "ranks": []})
                d["lowrank" if r.info.get("lowrank") else "dense"] += 1
                d["ranks"].append(r.info.get("rank", r.info.get("full_rank")))
            row["by_kind"] = {k: {"lowrank": v["lowrank"], "dense": v["dense"], "rank_min": min(v["ranks"]),
                                  "rank_median": int(statistics.median(v["ranks"])), "rank_max": max(v["ranks"]),
                                  "full_rank": min(decoder_linears_shape(k))} for k, v in by_kind.items()}
            errs = [r.error for r in rep.layers if r.error is not None]
            row["mean_layer_error"] = sum(errs) / len(errs) if errs else None
            row["layers"] = [{"name": r.name, "shape": r.shape, **{k: r.info.get(k) for k in
                              ("rank", "full_rank", "lowrank", "params_before", "params_after")}, "error": r.error}
                             for r in rep.layers]
        row["linear_params"] = linear_params(model)
        row["linear_params_dense"] = dense_params
        row["linear_params_saved_frac"] = 1 - row["linear_params"] / dense_params
        row["model_params"] = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as tmp:
            out, _ = save_compressed(model, tok, Path(tmp) / "m")
            row["saved_mb"] = folder_mb(out)
            if method:  # the saved folder reloads with its factorized modules and the same outputs
                back, _ = prunekit.load_model(str(out), args.dtype)
                x = torch.randint(0, min(1000, model.config.vocab_size), (1, 32))
                with torch.inference_mode():
                    row["reload_max_abs_diff"] = float((back(x).logits - model(x).logits).abs().max())
                del back
        res = perplexity(model, tok, "wikitext2", args.eval_seqlen, args.max_windows)
        row["wikitext2_ppl"] = res.ppl
        row["ppl_tokens"] = res.tokens
        row.update(latency(model, model.config.vocab_size, args.prefill, args.decode, args.repeats))
        print(json.dumps({k: v for k, v in row.items() if k not in ("layers",)}, default=str))
        rows.append(row)
        write(rows, args)  # after every row: partial results survive an interruption
        del model
        gc.collect()


def write(rows: list[dict], args) -> None:

    settings = {"model": "smollm2-135m", "dtype": args.dtype, "ppl": f"WikiText-2 test, first {args.max_windows} "
                f"windows of {args.eval_seqlen} tokens", "calibration (svd-llm only)":
                f"austen, {args.nsamples} x {args.seqlen} tokens, seed 0",
                "latency": f"batch 1, prefill {args.prefill} tokens, decode {args.decode} tokens with KV cache "
                f"after a 64-token prompt, median of {args.repeats} after one untimed warm-up of each, inference mode",
                "command": "python benchmarks/bench_lowrank.py"}
    write_results(RESULTS / "lowrank", {"environment": environment(), "settings": settings, "rows": rows},
                  lambda d: render(d["rows"], d["settings"], d["environment"]), indent=2)
    print((RESULTS / "lowrank.md").read_text())


def decoder_linears_shape(kind: str) -> tuple[int, int]:
    return {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
            "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}[kind]


def render(rows: list[dict], settings: dict, env: dict) -> str:
    dense = next((r for r in rows if r["method"] == "dense"), None)
    out = ["# Low-rank compression of SmolLM2-135M (measured)", ""]
    out += [f"- {k}: {v}" for k, v in settings.items()]
    out += [f"- machine: {env.get('processor')}, {env.get('threads')} torch threads; torch {env.get('torch')}, "
            f"transformers {env.get('transformers')}, prunekit {env.get('prunekit')}", ""]
    out += ["| variant | tau | rank below tau | rank removed | LRC / dense mats | linear params (M) | saved | "
            "folder MB | wiki2 ppl | prefill ms | decode ms/tok |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("summary", {})
        tau = f"{s['tau']:.4f}" if "tau" in s else "-"
        rr = f"{s['rank_reduction']:.3f}" if "rank_reduction" in s else "-"
        layers = r.get("layers") or []  # what the compressed model actually holds
        full = sum(x["full_rank"] for x in layers)
        applied = f"{sum(x['full_rank'] - x['rank'] for x in layers) / full:.3f}" if full else "-"
        mats = f"{r.get('lowrank_matrices', 0)} / {r.get('dense_matrices', 210 if r['method'] == 'dense' else 0)}"
        pre = r["prefill_ms"] / dense["prefill_ms"] if dense else None
        dec = r["decode_ms_per_token"] / dense["decode_ms_per_token"] if dense else None
        out.append(f"| {r['label']} | {tau} | {rr} | {applied} | {mats} | {r['linear_params'] / 1e6:.2f} | "
                   f"{r['linear_params_saved_frac']:.1%} | {r['saved_mb']:.0f} | {r['wikitext2_ppl']:.2f} | "
                   f"{r['prefill_ms']:.0f} ({pre:.2f}x) | {r['decode_ms_per_token']:.1f} ({dec:.2f}x) |")
    out += ["", "rank below tau: the share of all ranks whose normalised singular value is below tau (WeLore's "
            "target, as in the reference code). rank removed: the share the compressed model actually lost (WeLore "
            "leaves N-LRCs dense and untouched; svd/svd-llm with budget=params keep ranks by parameter share).", ""]
    out += ["## Which matrices became low rank (LRC) and their kept ranks", ""]
    for r in rows:
        if "by_kind" not in r:
            continue
        out.append(f"**{r['label']}** — " + "; ".join(
            f"{k}: {v['lowrank']} LRC / {v['dense']} dense, rank {v['rank_min']}–{v['rank_max']} "
            f"(median {v['rank_median']}) of {v['full_rank']}" for k, v in r["by_kind"].items()))
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
