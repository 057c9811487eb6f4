"""Prefill matmul on the decode kernels' input-major weights (W^T) against nn.Linear's layout, in torch.

The sparse decode kernels store every converted linear input-major (``W^T``, [in, out]) so a skipped
input skips a contiguous row; prefill then runs torch's matmul on that layout. This measures what
that costs, and whether another torch entry point on the same memory avoids it: for the linears of
one Qwen2.5-1.5B block (q, k, v, o, gate, up, down), at two prompt lengths, bf16 and fp32, the four
calls interleaved (median of 12). Run alone: it is a timing. Its output is quoted in
docs/activation_sparsity.md::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_prefill_layout.py
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import seconds
from prunekit.report import environment

SHAPES = [(1536, 1536, 2), (1536, 256, 2), (1536, 8960, 2), (8960, 1536, 1)]  # in, out, count (q+o, k+v, gate+up)


def _calls(x, W, wt):
    return {"F.linear(x, W) [stock]": lambda: F.linear(x, W), "matmul(x, W^T) [ours]": lambda: torch.matmul(x, wt),
            "F.linear(x, W^T.t())": lambda: F.linear(x, wt.t()),
            "(W^T.t() @ x.t()).t()": lambda: torch.matmul(wt.t(), x.t()).t().contiguous()}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    env = environment()
    print(f"{env['processor']}, {os.cpu_count()} cpus, {env['threads']} threads, torch {env['torch']}, "
          f"{time.strftime('%F %T')}, load {os.getloadavg()[0]:.2f}")
    for tokens in (128, 512):
        for dtype in (torch.bfloat16, torch.float32):
            total: dict[str, float] = {}
            for i, o, count in SHAPES:
                W = torch.randn(o, i, dtype=dtype) / i ** 0.5
                wt, x = W.t().contiguous(), torch.randn(tokens, i, dtype=dtype)
                calls = _calls(x, W, wt)
                times = {k: [] for k in calls}
                for f in calls.values():
                    f()
                for _ in range(12):
                    for k, f in calls.items():
                        times[k].append(seconds(f))
                for k, v in times.items():
                    total[k] = total.get(k, 0.0) + statistics.median(v) * 1e3 * count
            stock = next(iter(total.values()))
            print(f"{tokens} tokens, {str(dtype)[6:]}, one block (ms, speed vs stock): "
                  + "; ".join(f"{k} {v:.1f} ({stock / v:.2f}x)" for k, v in total.items()), flush=True)


if __name__ == "__main__":
    main()
