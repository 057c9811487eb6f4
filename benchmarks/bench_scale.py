"""In-memory vs block-streamed pruning and evaluation: peak memory, time, identical weights.

Each row runs in a fresh process (so its peak RSS is its own): load (or open lazily), Wanda 50 %
(fp32), WikiText-2 perplexity, and a SHA-256 per decoder block of the pruned weights. Streamed rows
read the checkpoint one block at a time and write each pruned block to its shard at once; their
perplexity is measured by the streamed evaluator on the written shards. The in-memory and
streamed rows of a model must have identical block checksums.

Usage (writes benchmarks/results/scale_stream.{md,json}; merged into scale.md):
    PRUNEKIT_DATA=../shared/data flock /tmp/prunekit-heavy.lock python benchmarks/bench_scale.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import write_results

HERE = Path(__file__).resolve().parent
ROWS = [
    ("smollm2-135m", "memory", 32, 1024, 20),
    ("smollm2-135m", "stream", 32, 1024, 20),
    ("qwen2.5-coder-1.5b", "stream", 16, 512, 8),
    ("qwen2.5-coder-1.5b", "memory", 16, 512, 8),
]


def block_hash(state: dict, prefix: str, i: int) -> str:
    h = hashlib.sha256()
    for k in sorted(k for k in state if k.startswith(f"{prefix}.{i}.")):
        h.update(k.encode())
        h.update(state[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def block_hashes(state: dict, prefix: str, n: int) -> list[str]:
    return [block_hash(state, prefix, i) for i in range(n)]


def run_one(model: str, mode: str, nsamples: int, seqlen: int, windows: int) -> dict:
    import prunekit
    from prunekit.calibration import peak_rss_mb
    from prunekit.data import calibration_ids
    from prunekit.models import find_blocks

    torch.set_num_threads(2)
    cfg = prunekit.PruneConfig(method="wanda", sparsity=0.5, calib=dict(dataset="austen", nsamples=nsamples,
                                                                        seqlen=seqlen, batch_size=8))
    t0 = time.perf_counter()
    row = {"model": model, "mode": mode, "calibration": f"austen {nsamples}x{seqlen}", "eval_windows": windows}
    if mode == "memory":
        m, tok = prunekit.load_model(model)
        row["load_s"] = time.perf_counter() - t0
        rep = prunekit.prune(m, cfg, calib=calibration_ids(cfg.calib, tok))
        ev = prunekit.evaluate(m, tok, prunekit.EvalConfig(seqlen=1024, max_windows=windows))["wikitext2"]
        state, (path, blocks) = m.state_dict(), find_blocks(m)
    else:
        from prunekit.eval import perplexity
        from prunekit.formats.lazy import LazyModel, SafetensorsSource
        from prunekit.streaming import open_lazy, prune_streamed

        lazy, tok = open_lazy(model)
        row["load_s"] = time.perf_counter() - t0
        out = Path(tempfile.mkdtemp(prefix="scale-"))
        rep = prune_streamed(lazy, cfg, out, tok, calib=calibration_ids(cfg.calib, tok))
        pruned = LazyModel(SafetensorsSource(out), torch.float32)
        ev = perplexity(pruned.model, tok, "wikitext2", 1024, windows)  # streamed: the model is lazy
        row["written_mb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    peak = peak_rss_mb()  # the pipeline's peak, before the checksums below
    if mode == "memory":
        hashes = block_hashes(state, path, len(blocks))
        params = sum(p.numel() for p in m.parameters())
    else:  # one block in memory at a time, as the pipeline itself
        path, blocks = find_blocks(pruned.model)
        hashes = []
        for i in range(len(blocks)):
            pruned.load(f"{path}.{i}")
            hashes.append(block_hash(pruned.model.state_dict(), path, i))
            pruned.release(f"{path}.{i}")
        params = sum(p.numel() for p in pruned.model.parameters())  # meta tensors know their shapes
    row.update(prune_s=rep.seconds, sparsity=rep.sparsity, ppl=ev.ppl, eval_s=ev.seconds, eval_tok_s=ev.tokens_per_s,
               calib_tok_s=nsamples * seqlen / rep.seconds, peak_rss_mb=peak,
               prune_peak_rss_mb=max(b.peak_rss_mb for b in rep.blocks), params=params,
               block_sha=hashes, total_s=time.perf_counter() - t0)
    return row


CGROUP_ROWS = [("qwen2.5-coder-1.5b", "auto"), ("qwen2.5-coder-1.5b", "none")]


def run_in_cgroup(model: str, offload: str, gb: float) -> dict:
    """``prunekit prune`` (CLI, default settings but small calibration) in a memory cgroup of ``gb``
    GB — smaller than the model's float32 weights — as on a machine whose memory cannot hold it."""
    import os

    cg = Path(f"/sys/fs/cgroup/memory/prunekit-bench-{os.getpid()}")
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(int(gb * 2**30)))
        out = Path(tempfile.mkdtemp(prefix="scale-cg-")) / "out"
        cmd = [sys.executable, "-m", "prunekit.cli", "prune", model, "--method", "wanda", "--sparsity", "0.5",
               "--nsamples", "16", "--seqlen", "512", "--eval", "wikitext2", "--eval-seqlen", "1024",
               "--max-windows", "8", "--threads", "2", "--offload", offload, "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())))
        peak = int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20
        lines = [x for x in proc.stdout.splitlines() if "ppl" in x or "peak RSS" in x or "streaming" in x]
        return {"model": model, "offload": offload, "cgroup_gb": gb, "returncode": proc.returncode,
                "seconds": time.perf_counter() - t0, "cgroup_peak_mb": peak, "output": lines[-8:],
                "stderr_tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else [],
                "command": "prunekit " + " ".join(cmd[3:])}
    finally:
        try:
            cg.rmdir()  # empty once the run has exited
        except OSError:
            pass


def render(data: dict) -> str:
    env = data["environment"]
    lines = ["# Scale: in-memory vs block-streamed pruning (Wanda 50 %, fp32)", "",
             f"Machine: {env['processor']}, {env['threads']} threads, {data['memory_gb']:.0f} GB RAM; torch {env['torch']}, "
             f"transformers {env['transformers']}. Command: `{data['command']}`. Every row is its own process; peak "
             "RSS is that process's maximum resident set (file pages included). Streamed rows read the checkpoint one "
             "block at a time (GGUF: dequantized per tensor) and write every pruned block to its shard at once; their "
             "perplexity is computed by the streamed evaluator on the written shards.", "",
             "| model | mode | calibration | load s | prune s | calib tok/s | peak RSS MB (prune) | peak RSS MB (all) | "
             "WikiText-2 ppl (1024 x windows) | eval tok/s | blocks identical to in-memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ref = next((x for x in data["rows"] if x["model"] == r["model"] and x["mode"] == "memory"), None)
        same = "-" if ref is None or ref is r else (
            f"{sum(a == b for a, b in zip(r['block_sha'], ref['block_sha']))} of {len(ref['block_sha'])}")
        lines.append(f"| {r['model']} | {r['mode']} | {r['calibration']} | {r['load_s']:.1f} | {r['prune_s']:.1f} | "
                     f"{r['calib_tok_s']:.0f} | {r['prune_peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['ppl']:.3f} ({r['eval_windows']}) | {r['eval_tok_s']:.0f} | {same} |")
    if data.get("cgroup"):
        lines += ["", "In a memory cgroup smaller than the model's float32 weights (as on a machine that cannot hold "
                  "them; the cgroup's peak counts page cache too):", "",
                  "| model | --offload | cgroup GB | exit code | seconds | cgroup peak MB | what it printed |", "|---|---|---|---|---|---|---|"]
        for r in data["cgroup"]:
            said = "; ".join(r["output"][-3:] + r["stderr_tail"]).replace("|", "/")
            lines.append(f"| {r['model']} | {r['offload']} | {r['cgroup_gb']:g} | {r['returncode']} | {r['seconds']:.0f} | "
                         f"{r['cgroup_peak_mb']:.0f} | {said} |")
        lines += ["", "Command: " + "; ".join(f"`{r['command']}`" for r in data["cgroup"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--only", default=None, help="comma-separated row indices")
    ap.add_argument("--out", default=str(HERE / "results" / "scale_stream"))
    ap.add_argument("--cgroup-gb", type=float, default=0.0,
                    help="also run the CLI in a memory cgroup of this size (needs root and cgroup v1); 0: skip")
    ap.add_argument("--cgroup-only", action="store_true", help="only the cgroup rows, merged into --out's JSON")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*json.loads(args.one))))
        return 0
    from prunekit.report import environment
    from prunekit.streaming import available_memory

    picks = [] if args.cgroup_only else [int(i) for i in args.only.split(",")] if args.only else range(len(ROWS))
    data = {"command": "PRUNEKIT_DATA=../shared/data python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
            "environment": environment(), "memory_gb": available_memory() / 2**30, "rows": []}
    if args.cgroup_only:
        data = json.loads(Path(args.out + ".json").read_text())
    if args.cgroup_gb:
        data["cgroup"] = [run_in_cgroup(m, o, args.cgroup_gb) for m, o in CGROUP_ROWS]
        print(json.dumps(data["cgroup"], indent=1), flush=True)
    for k in picks:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(ROWS[k])], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{ROWS[k]} failed:\n{proc.stderr[-3000:]}")
        data["rows"].append(json.loads(line[0][7:]))
        print(json.dumps(data["rows"][-1]), flush=True)
        write_results(args.out, data, render)
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
