"""``bench_decode``: the model's tokens/s with the sparse kernels next to the dense model's, interleaved."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..models.activation import state_of
from .generate import decode_seconds, interleaved, prefill_seconds
from .runtime import prepare_decode

log = logging.getLogger(__name__)


def bench_decode(model: nn.Module, prompt_tokens: int = 128, new_tokens: int = 64, prefill_tokens: int = 512,
                 repeats: int = 5, weights: str = "auto", seed: int = 0, convert_all: bool = False) -> dict:
    """Prefill and batch-1 decode time of the model dense (stock modules, no thresholds) and sparse
    (:func:`~.runtime.prepare_decode`), each ``repeats`` times interleaved after a warm-up.

    Random token ids (seeded) are the input; decoding is forced to ``new_tokens`` steps. Returns
    ``{"dense": ..., "sparse": ..., "speedup": ..., "decode_sparsity": ..., "weight_bytes": ...}``.
    """
    state = state_of(model)
    vocab = model.config.vocab_size
    total = _param_bytes(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, max(prefill_tokens, prompt_tokens)), generator=g)
    handle = {"h": None}
    info: dict = {}

    def to_dense() -> None:
        if state is not None:
            state.remove()

    def to_sparse() -> None:
        handle["h"] = prepare_decode(model, weights, convert_all=convert_all)
        info.setdefault("weight_bytes", handle["h"].weight_bytes())
        info.setdefault("modules", {"linears": len(handle["h"].linears), "ffns": len(handle["h"].ffns)})
        handle["h"].reset_stats()

    def leave(name: str) -> None:
        if name == "sparse":
            info["decode_sparsity"] = handle["h"].sparsity()
            info["bytes_per_token_sparse"] = total - _skipped_bytes(handle["h"])
            handle["h"].restore()
            if state is not None:
                state.remove()

    def measure(name: str):
        pre = prefill_seconds(model, ids[:, :prefill_tokens]) if prefill_tokens else None
        if name == "sparse":
            handle["h"].reset_stats()
        dec = decode_seconds(model, ids[:, :prompt_tokens], new_tokens) if new_tokens else None
        return pre, dec

    try:
        timings = interleaved({"dense": to_dense, "sparse": to_sparse}, measure, repeats, leave)
    finally:
        if handle["h"] is not None and (handle["h"].linears or handle["h"].ffns):
            handle["h"].restore()
        if state is not None:
            state.install(model)
    d, s = timings["dense"].summary(), timings["sparse"].summary()
    sp = info.get("decode_sparsity", {})
    out = {"dense": d, "sparse": s, "weights": weights, "repeats": repeats, "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "prefill_tokens": prefill_tokens, "threads": torch.get_num_threads(),
           "weight_bytes_sparse": info.get("weight_bytes"), "modules": info.get("modules"),
           "decode_sparsity_mean": sum(sp.values()) / len(sp) if sp else None,
           "bytes_per_token_dense": total, "bytes_per_token_sparse": info.get("bytes_per_token_sparse")}
    if d.get("decode_s_per_token") and s.get("decode_s_per_token"):
        out["decode_speedup"] = d["decode_s_per_token"]["median"] / s["decode_s_per_token"]["median"]
    if d.get("prefill_s") and s.get("prefill_s"):
        out["prefill_speedup"] = d["prefill_s"]["median"] / s["prefill_s"]["median"]
    return out


def _param_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (tied ones once): what a dense decode step reads at least once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _skipped_bytes(handle) -> int:
    """Bytes of weights the converted modules did not read, at the activation sparsity measured while decoding."""
    sp = handle.sparsity()
    skipped = 0
    for name, m in handle.linears.items():
        isz = m.packed.vals.element_size() if m.fmt == "bitmask" else m.wt.element_size()
        dense = m.in_features * m.out_features * isz
        skipped += dense - m.weight_bytes() * (1 - sp.get(name, 0.0))
    for name, m in handle.ffns.items():
        skipped += (m.wup.numel() + m.wdt.numel()) * m.wup.element_size() * sp.get(name, 0.0)
    return int(skipped)
