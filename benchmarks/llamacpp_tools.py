"""Running llama.cpp's own tools on a GGUF: perplexity, llama-bench and greedy generation (for bench_deploy).

Each function returns the command it ran with the numbers, so every result can be traced and rerun.
The binaries are the cached build of ``benchmarks/llamacpp.py build`` (:mod:`prunekit.formats.llamacpp`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
from pathlib import Path

from prunekit.formats.llamacpp import binary

#: WikiText-2 perplexity in llama.cpp with prunekit's windows: ``llama-perplexity`` in strided mode widens
#: its context by stride/2, so ``-c 513 --ppl-stride 1023`` gives windows of exactly 1024 tokens, one every
#: 1023 tokens, scoring targets 1..1023 of each (every token after the first, scored once, with 0..1022
#: tokens of context) — prunekit scores targets 1..1023 of windows that start every 1024 tokens.
PPL_SEQLEN = 1024


def _env() -> dict:
    """The environment for llama.cpp's tools, without OMP_WAIT_POLICY: ggml's CPU backend runs on OpenMP, and the
    PASSIVE policy prunekit's benchmarks set for torch puts its threads to sleep between ops — measured here,
    SmolLM2 q8_0 decode at 2 threads fell from 79 to 29 tok/s (prefill 601 -> 561)."""
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def _run(cmd: list[str], timeout: float) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(shlex.quote, cmd))} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return proc.stdout + proc.stderr


def perplexity(gguf: Path, text_file: Path, chunks: int, threads: int = 2, kv: str | None = None,
               timeout: float = 3600) -> dict:
    """llama-perplexity over the first ``chunks`` windows of :data:`PPL_SEQLEN` tokens (see above).

    ``kv`` sets the KV cache type (``-ctk/-ctv``, e.g. ``"f32"``); None keeps llama.cpp's default (f16).
    """
    stride = PPL_SEQLEN - 1
    cmd = [str(binary("llama-perplexity")), "-m", str(gguf), "-f", str(text_file), "-c", str(PPL_SEQLEN - stride // 2),
           "-b", str(PPL_SEQLEN), "--ppl-stride", str(stride), "--chunks", str(chunks), "-t", str(threads)]
    if kv:
        cmd += ["-ctk", kv, "-ctv", kv]
    out = _run(cmd, timeout)
    running = re.findall(r"\[(\d+)\]([0-9.]+|nan|inf),", out)
    tokens = re.search(r"have (\d+) tokens", out)
    window = re.search(r"n_ctx=(\d+)", out)
    if not running:
        raise RuntimeError(f"no perplexity in llama-perplexity's output: {out[-800:]}")
    return {"ppl": float(running[-1][1]), "chunks": int(running[-1][0]), "window": int(window[1]) if window else None,
            "targets": int(running[-1][0]) * stride, "text_tokens": int(tokens[1]) if tokens else None,
            "kv": kv or "f16", "command": " ".join(map(shlex.quote, cmd))}


def bench(models: list[Path], threads: int = 2, prompt: int = 512, gen: int = 128, reps: int = 5,
          timeout: float = 3600) -> dict:
    """``llama-bench`` with every model in one invocation; per model and test the median and all samples (tok/s)."""
    cmd = [str(binary("llama-bench"))]
    for m in models:
        cmd += ["-m", str(m)]
    cmd += ["-p", str(prompt), "-n", str(gen), "-t", str(threads), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-1500:]}")
    runs = json.loads(proc.stdout)
    out: dict[str, list[dict]] = {}
    for r in runs:
        kind = "prefill" if r["n_prompt"] > 0 and r["n_gen"] == 0 else "decode"
        samples = [float(x) for x in r["samples_ts"]]
        out.setdefault(r["model_filename"], []).append({
            "test": kind, "median_tps": statistics.median(samples), "min_tps": min(samples), "max_tps": max(samples),
            "samples_tps": samples, "model_size": r.get("model_size"), "model_n_params": r.get("model_n_params"),
            "build_commit": r.get("build_commit"), "cpu_info": r.get("cpu_info"), "n_threads": r.get("n_threads"),
            "type_k": r.get("type_k"), "flash_attn": r.get("flash_attn")})
    return {"command": " ".join(map(shlex.quote, cmd)), "results": out}


def generate(gguf: Path, prompt: str, tokens: int = 48, threads: int = 2, kv: str | None = None,
             timeout: float = 600) -> dict:
    """Greedy continuation of ``prompt`` by ``llama-completion`` (no chat template); ``kv`` as in perplexity."""
    cmd = [str(binary("llama-completion")), "-m", str(gguf), "-p", prompt, "-n", str(tokens), "-t", str(threads),
           "--temp", "0", "--seed", "0", "-no-cnv", "--no-display-prompt", *(["-ctk", kv, "-ctv", kv] if kv else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if proc.returncode != 0:
        raise RuntimeError(f"llama-completion failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return {"prompt": prompt, "text": proc.stdout.strip(), "command": " ".join(map(shlex.quote, cmd))}
