"""One SmolLM2-shaped decoder block training step (forward + backward + AdamW, 2 x 1024 tokens) in float32 and
under bf16 autocast, interleaved in one process: whether bf16 pays for the block fit on this CPU.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_blockfit_amp.py

Measured 2026-12-07 on an AVX2-only AMD EPYC (no avx512_bf16), 2 threads, torch 2.13.0: float32
0.89-0.93 s, bf16 15.8-16.3 s per step (3 runs each; a rerun of this script: 0.86-0.91 / 14.6-15.3 s) — why ``reconstruct`` defaults to ``amp=auto``.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from common import cpu_flags, seconds
from prunekit.report import environment


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    env, flags = environment(), cpu_flags()
    print(f"{env['processor']} ({' '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in flags) or 'no bf16 units'}), "
          f"2 threads, torch {env['torch']}, {time.strftime('%F %T')}, load {os.getloadavg()[0]:.2f}")
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64)
    block = LlamaDecoderLayer(cfg, 0)
    x = torch.randn(2, 1024, 576)
    pe = LlamaRotaryEmbedding(cfg)(x, torch.arange(1024)[None])
    opt = torch.optim.AdamW(block.parameters(), lr=1e-5)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = block(x, position_embeddings=pe, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    times: dict[bool, list[float]] = {False: [], True: []}
    for bf16 in (False, True):
        step(bf16)  # warm-up
    for _ in range(3):
        for bf16 in (False, True):
            times[bf16].append(seconds(lambda: step(bf16)))
    for bf16, t in times.items():
        print(f"{'bf16' if bf16 else 'float32'}: {' / '.join(f'{v:.2f}' for v in sorted(t))} s per step")


if __name__ == "__main__":
    main()
