"""Speed of two prunekit source trees in one run: did a change make pruning or evaluation slower?

Runs ``bench_core.py --one`` (a fresh process per configuration: load, prune, evaluate) with
``PYTHONPATH`` pointing at each tree in turn, alternating A, B, A, B … so that drifting machine load
hits both equally; reports the median prune time and evaluation throughput of each and their ratio.
The library API used (``prune``, ``evaluate``, ``CalibConfig``) is the same in both trees.

Usage (writes benchmarks/results/engine_speed.{md,json}):
    PRUNEKIT_DATA=../shared/data flock /tmp/prunekit-heavy.lock python benchmarks/engine_speed.py \\
        --a OLD_TREE/src --b NEW_TREE/src
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import write_results

HERE = Path(__file__).resolve().parent
CONFIGS = [("dense", "-", "float32"), ("wanda", "unstructured", "float32"), ("sparsegpt", "unstructured", "float32")]


def one(src: str, conf, args) -> dict:
    cmd = [sys.executable, str(HERE / "bench_core.py"), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--batch-size", "8", "--windows", str(args.windows), "--eval-seqlen", "1024", "--one", json.dumps(conf)]
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{conf} with {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="src folder of the baseline tree")
    ap.add_argument("--b", required=True, help="src folder of the changed tree")
    ap.add_argument("--label-a", default="before")
    ap.add_argument("--label-b", default="after")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "results" / "engine_speed"))
    args = ap.parse_args()
    runs: dict[str, dict[str, list[dict]]] = {}
    for rnd in range(args.rounds):
        for conf in CONFIGS:
            order = [("a", args.a), ("b", args.b)] if rnd % 2 == 0 else [("b", args.b), ("a", args.a)]
            for side, src in order:
                r = one(src, conf, args)
                r["loadavg"] = os.getloadavg()[0]
                runs.setdefault(f"{conf[0]} {conf[1]} {conf[2]}", {}).setdefault(side, []).append(r)
                print(json.dumps({"round": rnd, "side": side, **r}), flush=True)
    result = {"settings": vars(args), "runs": runs, "environment": _env()}
    write_results(args.out, result, render)
    print(render(result))
    return 0


def _env() -> dict:
    from prunekit.report import environment

    return environment()


def render(res) -> str:
    s, env = res["settings"], res["environment"]
    lines = ["# Engine speed: two source trees, alternated in one run", "",
             f"Machine: {env['processor']}, {env['threads']} threads; torch {env['torch']}, transformers "
             f"{env['transformers']}. SmolLM2-135M fp32, calibration austen {s['nsamples']} x {s['seqlen']}, batch 8; "
             f"eval WikiText-2 first {s['windows']} windows of 1024. {s['rounds']} rounds, order alternated "
             f"({s['label_a']} = `{s['a']}`, {s['label_b']} = `{s['b']}`). Medians.", "",
             f"Command: `python benchmarks/engine_speed.py --a {s['a']} --b {s['b']} --rounds {s['rounds']}`", "",
             f"| config | prune s {s['label_a']} | prune s {s['label_b']} | ratio | eval tok/s {s['label_a']} | "
             f"eval tok/s {s['label_b']} | ratio | ppl {s['label_a']} | ppl {s['label_b']} |", "|---|---|---|---|---|---|---|---|---|"]
    for name, sides in res["runs"].items():
        a, b = sides["a"], sides["b"]
        pa = statistics.median(r.get("prune_s", 0.0) for r in a)
        pb = statistics.median(r.get("prune_s", 0.0) for r in b)
        ta = statistics.median(r["eval_tok_s"] for r in a)
        tb = statistics.median(r["eval_tok_s"] for r in b)
        lines.append(f"| {name} | {pa:.1f} | {pb:.1f} | {pb / pa if pa else float('nan'):.3f} | {ta:.0f} | {tb:.0f} | "
                     f"{tb / ta:.3f} | {a[0]['ppl']:.4f} | {b[0]['ppl']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
