"""Which FFN widths run fast on this CPU: the multiple structured pruning rounds channels to.

Times SmolLM2-135M's FFN (gate and up: ``[width, 576]``, SiLU-gated, down: ``[576, width]``) as
``torch.nn.functional.linear`` calls — one token (decode, a matrix-vector product) and 512 tokens
(prefill) — for every width from 960 to 1088 in steps of 8, in float32 and bfloat16, median of
``--reps`` after a warm-up. Time per channel exposes widths that fall off the vector/tile grid.

    flock /tmp/prunekit-heavy.lock python benchmarks/bench_widths.py

Writes ``benchmarks/results/widths.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import write_results

HERE = Path(__file__).resolve().parent


def ffn_time(width: int, tokens: int, dtype: torch.dtype, reps: int, hidden: int = 576) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, hidden, generator=g).to(dtype)
    wg, wu = (torch.randn(width, hidden, generator=g).to(dtype) for _ in range(2))
    wd = torch.randn(hidden, width, generator=g).to(dtype)

    def run():
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    for _ in range(5):
        run()
    times = []
    inner = 50 if tokens == 1 else 3
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            run()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="*", type=int, default=list(range(960, 1089, 8)))
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=str(HERE / "results" / "widths"))
    args = ap.parse_args()
    from prunekit.report import environment

    rows = []
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for tokens in (1, 512):
                for w in args.widths:
                    t = ffn_time(w, tokens, dtype, args.reps)
                    rows.append({"dtype": str(dtype).split(".")[-1], "tokens": tokens, "width": w, "us": 1e6 * t,
                                 "ns_per_channel": 1e9 * t / w})
                    print(json.dumps(rows[-1]), flush=True)
    data = {"environment": environment(), "reps": args.reps, "rows": rows,
            "command": "python benchmarks/bench_widths.py"}
    write_results(args.out, data, render)


def render(data: dict) -> str:
    env = data["environment"]
    out = ["# FFN width vs time on this CPU (SmolLM2-135M's FFN, hidden 576)", "",
           f"`{data['command']}` — {env['processor']}, {env['threads']} threads, torch {env['torch']}; median of "
           f"{data['reps']} after a warm-up; gate/up/down as F.linear with SiLU gating; time per channel = time / width.",
           "", "| width | width % 32 | width % 64 | fp32 1 tok (us) | fp32 512 tok (us) | bf16 1 tok (us) | "
           "bf16 512 tok (us) | fp32 512 ns/ch | bf16 512 ns/ch |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["dtype"], r["tokens"], r["width"]): r for r in data["rows"]}
    for w in sorted({r["width"] for r in data["rows"]}):
        c = [by.get((d, t, w)) for d, t in (("float32", 1), ("float32", 512), ("bfloat16", 1), ("bfloat16", 512))]
        out.append(f"| {w} | {w % 32} | {w % 64} | " + " | ".join(f"{x['us']:.0f}" if x else "-" for x in c)
                   + f" | {c[1]['ns_per_channel']:.0f} | {c[3]['ns_per_channel']:.0f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
