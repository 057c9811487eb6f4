"""One SmolLM2-shaped decoder block training step (forward + backward + AdamW, 2 x 1024 tokens) in float32 and
under bf16 autocast, interleaved in one process: whether bf16 pays for the block fit on this CPU.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_blockfit_amp.py

Measured 2026-12-07 on an AVX2-only AMD EPYC (no avx512_bf16), 2 threads, torch 2.13.0: float32
0.89-0.93 s, bf16 15.8-16.3 s per step (3 runs each) — why ``reconstruct`` defaults to ``amp=auto``.
"""
import time, torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
torch.manual_seed(0); torch.set_num_threads(2)
cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
blk = LlamaDecoderLayer(cfg, 0); rope = LlamaRotaryEmbedding(cfg)
x = torch.randn(2, 1024, 576); pos = torch.arange(1024)[None]; pe = rope(x, pos)
opt = torch.optim.AdamW(blk.parameters(), lr=1e-5)
def step(amp):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with ctx:
        out = blk(x, position_embeddings=pe, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
    loss = out.float().pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
for amp in (False, True):
    step(amp)
res = {False: [], True: []}
for _ in range(3):
    for amp in (False, True):
        t = time.perf_counter(); step(amp); res[amp].append(time.perf_counter() - t)
print({("bf16" if k else "fp32"): [round(v, 2) for v in sorted(r)] for k, r in res.items()})
