"""This CPU's kernel throughput by dtype: the matmul and the causal attention SmolLM2 runs.

Explains how much ``--dtype bfloat16`` can gain on a given machine: a dense forward is mostly
matmuls (which speed up where the CPU has bf16 units) plus scaled-dot-product attention (which
may not). Shapes are SmolLM2-135M's: hidden 576, MLP 1536, 9 query heads of 64, 1024 tokens.

    python benchmarks/bench_kernels.py     # writes benchmarks/results/kernels.{md,json}
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from prunekit.report import environment

from common import mean_seconds, save_json

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    rows = []
    for name, dt in DTYPES.items():
        x = torch.randn(1024, 576, dtype=dt)
        for out_features in (576, 1536):
            w = torch.randn(out_features, 576, dtype=dt)
            s = mean_seconds(lambda: x @ w.t(), 50)
            rows.append({"dtype": name, "kernel": f"linear 1024x576 -> {out_features}", "ms": 1e3 * s,
                         "gflops": 2 * 1024 * 576 * out_features / s / 1e9})
        q, k, v = (torch.randn(1, 9, 1024, 64, dtype=dt) for _ in range(3))
        s = mean_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 20)
        flops = 2 * 2 * 9 * 64 * 1024 * 1025 / 2  # QK^T and AV over the causal half
        rows.append({"dtype": name, "kernel": "causal SDPA 9 heads x 1024 x 64", "ms": 1e3 * s, "gflops": flops / s / 1e9})
    env = environment()
    save_json(RESULTS / "kernels.json", {"environment": env, "rows": rows}, indent=2)
    lines = ["# Kernel throughput by dtype (this CPU)", "",
             f"Machine: {env.get('processor')}, {env.get('threads')} threads; torch {env.get('torch')}. "
             "Command: `python benchmarks/bench_kernels.py`.", "",
             "| kernel | float32 ms | float32 GFLOP/s | bfloat16 ms | bfloat16 GFLOP/s | bf16 speed-up |",
             "|---|---|---|---|---|---|"]
    by = {(r["kernel"], r["dtype"]): r for r in rows}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        a, b = by[(kernel, "float32")], by[(kernel, "bfloat16")]
        lines.append(f"| {kernel} | {a['ms']:.2f} | {a['gflops']:.0f} | {b['ms']:.2f} | {b['gflops']:.0f} | "
                     f"{a['ms'] / b['ms']:.2f}x |")
    (RESULTS / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
