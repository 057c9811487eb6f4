"""Core benchmark: magnitude / Wanda / SparseGPT x {50% unstructured, 2:4} on SmolLM2-135M.

Records, next to this machine's measured matmul throughput (the floor):
  * prune wall time (calibration: ``--nsamples`` x ``--seqlen`` tokens of Austen, seed 0),
  * evaluation throughput (tokens/s) and WikiText-2 perplexity on the first ``--windows``
    windows of ``--eval-seqlen`` tokens of the test split,
  * peak RSS of the process (each configuration runs in its own fresh process),
in float32 and (for the bf16 rows) bfloat16.

Usage (writes benchmarks/results/core.{md,json}):
    PRUNEKIT_DATA=../shared/data flock /tmp/prunekit-heavy.lock python benchmarks/bench_core.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import matmul_rates, write_results

HERE = Path(__file__).resolve().parent
CONFIGS = [
    ("dense", "-", "float32"),
    ("magnitude", "unstructured", "float32"), ("wanda", "unstructured", "float32"), ("sparsegpt", "unstructured", "float32"),
    ("magnitude", "2:4", "float32"), ("wanda", "2:4", "float32"), ("sparsegpt", "2:4", "float32"),
    ("dense", "-", "bfloat16"), ("wanda", "unstructured", "bfloat16"), ("sparsegpt", "unstructured", "bfloat16"),
]


def model_flops(cfg, seqlen: int) -> dict[str, float]:
    """FLOPs per token of the pieces the methods must compute (multiply-add = 2 FLOPs)."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    attn_proj = h * h * 2 + h * kv * 2  # q, o, k, v
    mlp = 3 * h * i
    ctx = (seqlen + 1) / 2  # causal attention: each query sees (t+1) keys on average
    attn = 2 * 2 * ctx * h  # QK^T and AV
    block = 2 * (attn_proj + mlp) + attn
    down = 2 * h * i
    hess = 2 * (h * h * 3 + i * i)  # X^T X for the 4 distinct inputs (qkv, o, gate/up, down)
    return {"block": block, "down": down, "lm_head": 2 * h * cfg.vocab_size, "layers": L, "hessian": hess}


def run_one(method: str, pattern: str, dtype: str, args) -> dict:
    import prunekit
    from prunekit.calibration import peak_rss_mb
    from prunekit.config import CalibConfig
    from prunekit.data import calibration_ids

    torch.manual_seed(0)
    model, tok = prunekit.load_model("smollm2-135m", dtype=dtype)
    out = {"method": method, "pattern": pattern, "dtype": dtype}
    if method != "dense":
        calib = CalibConfig("austen", nsamples=args.nsamples, seqlen=args.seqlen, seed=0, batch_size=args.batch_size)
        ids = calibration_ids(calib, tok)
        cfg = prunekit.PruneConfig(method=method, sparsity=None if ":" in pattern else 0.5, pattern=pattern, calib=calib)
        rep = prunekit.prune(model, cfg, calib=ids)
        out.update(prune_s=rep.seconds, sparsity=rep.sparsity)
    ev = prunekit.evaluate(model, tok, prunekit.EvalConfig(("wikitext2",), args.eval_seqlen, args.windows))["wikitext2"]
    if method == "dense" and dtype == "float32":
        # the plain reference loop (wanda's eval_ppl_wikitext shape: one window per forward, full
        # logits, shifted CrossEntropyLoss) in the same process, alternated with ours, so the
        # throughput target is measured against this machine as it is right now
        ref, ours = [], [ev.tokens_per_s]
        for _ in range(2):
            ref.append(plain_loop_tok_s(model, tok, args))
            ours.append(prunekit.evaluate(model, tok, prunekit.EvalConfig(("wikitext2",), args.eval_seqlen,
                                                                          args.windows))["wikitext2"].tokens_per_s)
        out.update(plain_loop_tok_s=ref, prunekit_tok_s=ours)
    out.update(ppl=ev.ppl, eval_tok_s=ev.tokens_per_s, eval_s=ev.seconds, windows=ev.windows, tokens=ev.tokens,
               peak_rss_mb=peak_rss_mb())
    return out


def plain_loop_tok_s(model, tok, args) -> float:
    """Tokens/s of a textbook perplexity loop over the same windows (the reference's shape)."""
    from prunekit.eval.perplexity import eval_token_ids

    ids = eval_token_ids(tok, "wikitext2", args.eval_seqlen)
    n, loss_fn = args.eval_seqlen, torch.nn.CrossEntropyLoss()
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(args.windows):
            x = ids[i * n : (i + 1) * n].unsqueeze(0)
            logits = model(x).logits
            loss_fn(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    return args.windows * n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None, help="comma-separated indices of CONFIGS to run")
    ap.add_argument("--out", default=str(HERE / "results" / "core"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out's JSON that this run does not redo (same settings only)")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*json.loads(args.one), args)))
        return

    from transformers import AutoConfig

    from prunekit.formats.gguf_read import gguf_cache_dir as _gguf_cache_dir
    from prunekit.formats.sources import resolve_source
    from prunekit.report import environment

    prunekit_load = __import__("prunekit").load_model
    prunekit_load("smollm2-135m")  # make sure the safetensors cache exists before timing
    cfg = AutoConfig.from_pretrained(_gguf_cache_dir(resolve_source("smollm2-135m")))
    gf = matmul_rates()
    fl = model_flops(cfg, args.eval_seqlen)
    fl_cal = model_flops(cfg, args.seqlen)
    rows = []
    picks = [int(i) for i in args.only.split(",")] if args.only else range(len(CONFIGS))
    base = [sys.executable, __file__, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--batch-size", str(args.batch_size), "--windows", str(args.windows), "--eval-seqlen", str(args.eval_seqlen)]
    for k in picks:
        conf = CONFIGS[k]
        load_before = os.getloadavg()[0]
        proc = subprocess.run(base + ["--one", json.dumps(conf)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{conf} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        r["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        g = gf[r["dtype"]] * 1e9
        eval_flops = r["tokens"] / (args.eval_seqlen - 1) * args.eval_seqlen * (fl["block"] * fl["layers"] + fl["lm_head"])
        r["eval_floor_s"] = eval_flops / g
        if r["method"] in ("wanda", "sparsegpt"):
            ntok = args.nsamples * args.seqlen
            per_tok = fl_cal["layers"] * (2 * fl_cal["block"] - fl_cal["down"])
            if r["method"] == "sparsegpt":
                per_tok += fl_cal["layers"] * fl_cal["hessian"]
            r["prune_floor_s"] = ntok * per_tok / g
        rows.append(r)
        print(json.dumps(r), flush=True)
    kept, commands = [], []
    old_path = Path(args.out + ".json")
    if args.merge and old_path.is_file():
        old = json.loads(old_path.read_text())
        redone = {(r["method"], r["pattern"], r["dtype"]) for r in rows}
        kept = [r for r in old["rows"] if (r["method"], r["pattern"], r["dtype"]) not in redone]
        commands = old.get("commands", [old.get("command")])
        for r in kept:
            r.setdefault("from_earlier_run", True)
    order = {c: i for i, c in enumerate(CONFIGS)}
    rows = sorted(kept + rows, key=lambda r: order.get((r["method"], r["pattern"], r["dtype"]), 99))
    result = {"environment": environment(), "matmul_gflops": gf,
              "settings": {"model": "smollm2-135m (GGUF Q4_1, dequantized)", "calibration": "austen, seed 0",
                           "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size,
                           "eval": f"wikitext2 test, first {args.windows} windows of {args.eval_seqlen} tokens"},
              "rows": rows, "commands": commands + ["PRUNEKIT_DATA=../shared/data python benchmarks/bench_core.py "
                                                     + " ".join(sys.argv[1:])]}
    write_results(args.out, result, render, indent=2)
    print(render(result))


def render(res: dict) -> str:
    env, s = res["environment"], res["settings"]
    fp32 = {(r["method"], r["pattern"]): r for r in res["rows"] if r["dtype"] == "float32"}
    lines = [
        "# Core benchmark: SmolLM2-135M, magnitude / Wanda / SparseGPT", "",
        f"Machine: {env['processor']}, {env['threads']} threads; torch {env['torch']}, transformers {env['transformers']}, "
        f"prunekit {env['prunekit']}.",
        f"Measured matmul throughput (2048², this machine): fp32 {res['matmul_gflops']['float32']:.0f} GFLOP/s, "
        f"bf16 {res['matmul_gflops']['bfloat16']:.0f} GFLOP/s.",
        f"Settings: calibration {s['calibration']}, {s['nsamples']} x {s['seqlen']} tokens, batch {s['batch_size']}; "
        f"eval {s['eval']}. Floors = FLOPs the method must do / measured matmul throughput. "
        "`load` is the 1-minute load average before/after each row (2 cores: above ~2 means other work shared the CPU).", "",
        "Command(s): " + "; ".join(f"`{c}`" for c in res.get("commands", [res.get("command")])) +
        (" (rows marked * come from the earlier command, kept with `--merge`)" if any(r.get("from_earlier_run") for r in res["rows"]) else ""),
        "",
        "| method | pattern | dtype | sparsity | WikiText-2 ppl | prune s | prune floor s | eval tok/s | eval s | eval floor s | peak RSS MB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append("| {method} | {pattern} | {dtype} | {sp} | {ppl:.3f} | {ps} | {pf} | {tps:.0f} | {es:.1f} | {ef:.1f} | {rss:.0f} | {load} |".format(
            method=r["method"] + ("*" if r.get("from_earlier_run") else ""), pattern=r["pattern"], dtype=r["dtype"], sp=f"{r['sparsity']:.4f}" if "sparsity" in r else "0",
            ppl=r["ppl"], ps=f"{r['prune_s']:.1f}" if "prune_s" in r else "-",
            pf=f"{r['prune_floor_s']:.1f}" if "prune_floor_s" in r else "-", tps=r["eval_tok_s"], es=r["eval_s"],
            ef=r["eval_floor_s"], rss=r["peak_rss_mb"], load="/".join(map(str, r.get("loadavg_1min", [])))))
    dense32 = next((r for r in res["rows"] if r["method"] == "dense" and "plain_loop_tok_s" in r), None)
    if dense32:
        ours, ref = dense32["prunekit_tok_s"], dense32["plain_loop_tok_s"]
        lines += ["", "fp32 evaluation throughput vs a plain reference-style loop (one window per forward, full "
                  "logits, shifted cross-entropy), alternated in the same process on the same windows: prunekit "
                  + ", ".join(f"{x:.0f}" for x in ours) + " tok/s; plain loop " + ", ".join(f"{x:.0f}" for x in ref)
                  + f" tok/s (best {max(ours):.0f} vs {max(ref):.0f})."]
    bf = [r for r in res["rows"] if r["dtype"] == "bfloat16"]
    if bf:
        lines += ["", "bf16 vs fp32 (same settings):", ""]
        for r in bf:
            ref = fp32.get((r["method"], r["pattern"])) if r["method"] != "dense" else None
            if r["method"] == "dense":
                ref_tps = next((x["eval_tok_s"] for x in res["rows"] if x["dtype"] == "float32"), None)
                lines.append(f"- dense eval: {r['eval_tok_s']:.0f} tok/s bf16" +
                             (f" vs {ref_tps:.0f} tok/s fp32 (pruned fp32 models run at dense speed): "
                              f"{r['eval_tok_s'] / ref_tps:.2f}x" if ref_tps else "") + f"; dense bf16 ppl {r['ppl']:.3f}")
            elif ref:
                lines.append(f"- {r['method']} {r['pattern']}: prune {ref['prune_s']:.1f}s -> {r['prune_s']:.1f}s "
                             f"({ref['prune_s'] / r['prune_s']:.2f}x), eval {r['eval_tok_s'] / ref['eval_tok_s']:.2f}x, "
                             f"ppl {ref['ppl']:.3f} -> {r['ppl']:.3f} ({(r['ppl'] / ref['ppl'] - 1) * 100:+.2f}%)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
