"""Greedy decoding with a KV cache, and its timing: tokens/s of a model, dense vs sparse interleaved."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class Generation:
    """Token ids generated after a prompt, and how long prefill and decoding took."""

    ids: list[int]
    prefill_s: float
    decode_s: float

    @property
    def decode_tok_s(self) -> float:
        return len(self.ids) / self.decode_s if self.decode_s > 0 else float("inf")


@torch.inference_mode()
def greedy(model: nn.Module, prompt: Tensor, max_new_tokens: int, eos: int | None = None) -> Generation:
    """Greedy decoding of ``max_new_tokens`` after ``prompt`` (``[1, n]`` ids); stops at ``eos`` if given.

    The first new token comes from the prefill; each further token is one batch-1 decode step.
    ``decode_s`` times the steps after the prefill (``len(ids) - 1`` of them).
    """
    t0 = time.perf_counter()
    out = model(prompt, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    cache = out.cache
    t1 = time.perf_counter()
    ids = [int(nxt)]
    for _ in range(max_new_tokens - 1):
        if eos is not None and ids[-1] == eos:
            break
        out = model(nxt, cache=cache, use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        ids.append(int(nxt))
    t2 = time.perf_counter()
    return Generation(ids, t1 - t0, (t2 - t1) * len(ids) / max(len(ids) - 1, 1))


@dataclass
class Timing:
    """Repeated measurements of one variant (seconds), with their median and spread."""

    prefill: list[float] = field(default_factory=list)
    decode_tok: list[float] = field(default_factory=list)  # seconds per decoded token

    def summary(self) -> dict:
        def stats(v: list[float]) -> dict:
            return {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v} if v else {}

        return {"prefill_s": stats(self.prefill), "decode_s_per_token": stats(self.decode_tok),
                "decode_tok_s": 1 / statistics.median(self.decode_tok) if self.decode_tok else None}


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: Tensor) -> float:
    t0 = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_seconds(model: nn.Module, prompt: Tensor, new_tokens: int) -> float:
    """Seconds per token of ``new_tokens`` forced decode steps (no early stop) after a prefill of ``prompt``."""
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, cache=cache, use_cache=True, logits_to_keep=1)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / new_tokens


def interleaved(variants: dict[str, Callable[[], None]], measure: Callable[[str], tuple[float | None, float | None]],
                repeats: int = 5, leave: Callable[[str], None] | None = None) -> dict[str, Timing]:
    """Time every variant ``repeats`` times, interleaved (A B, B A, A B, …) so drift reaches all alike.

    ``variants[name]()`` switches the model to that variant (not timed); ``measure(name)`` returns
    ``(prefill seconds or None, decode seconds per token or None)``; ``leave(name)`` undoes a variant.
    Every variant is run once untimed first (warm-up).
    """
    names = list(variants)
    out = {n: Timing() for n in names}
    for rep in range(repeats + 1):
        for n in (names if rep % 2 == 0 else names[::-1]):
            variants[n]()
            pre, dec = measure(n)
            if leave is not None:
                leave(n)
            if rep == 0:
                continue  # warm-up
            if pre is not None:
                out[n].prefill.append(pre)
            if dec is not None:
                out[n].decode_tok.append(dec)
    return out
