"""Arguments and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import os
from typing import Any

import yaml


class UserError(Exception):
    """A mistake in the command line, reported as one line without a traceback."""


def friendly(e: Exception) -> str | None:
    """The one-line message for errors caused by user input; ``None`` for real bugs."""
    from ..data import DataNotFoundError
    from ..models import UnsupportedModelError

    if isinstance(e, KeyError):
        return str(e.args[0]) if e.args else str(e)
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, PermissionError, DataNotFoundError,
                      UnsupportedModelError)):
        return str(e)
    if isinstance(e, OSError) and e.errno is not None:
        return e.strerror if e.strerror else str(e)
    return None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF folder, .gguf file, hub id (org/name) or alias (see `prunekit ls`)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="weights and activations dtype (default float32; bfloat16 is ~3x faster on AVX-512 BF16 CPUs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin weights when a model has no safetensors (unpickling can run code)")
    p.add_argument("--data-dir", default=None, help="local dataset copies (default: $PRUNEKIT_DATA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")


def add_eval_args(p: argparse.ArgumentParser, flag: str = "--eval", default: list[str] | None = None) -> None:
    p.add_argument(flag, dest="eval_datasets", nargs="*", default=default if default is not None else ["wikitext2"],
                   metavar="DATASET", help="perplexity datasets (registered names or text files); none to skip")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window length (default: --seqlen)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward pass (default 1)")


def parse_options(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["percdamp=0.1", "blocksize=64"]`` → ``{"percdamp": 0.1, "blocksize": 64}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what} option {item!r} is not KEY=VALUE, e.g. percdamp=0.01")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def setup_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if getattr(args, "data_dir", None):
        os.environ["PRUNEKIT_DATA"] = args.data_dir


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    """A plain, aligned text table."""
    allrows = ([header] if header else []) + rows
    widths = [max(len(str(r[i])) for r in allrows) for i in range(len(allrows[0]))]
    lines = []
    for k, r in enumerate(allrows):
        lines.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if header and k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_ppl(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 1e4 else f"{x:.3e}"


def run_perplexity(model, tokenizer, datasets: list[str], seqlen: int, max_windows: int | None, batch_size: int,
                   label: str) -> dict:
    """Perplexity on each dataset with a progress bar; returns ``{dataset: PerplexityResult}``."""
    from tqdm import tqdm

    from ..api import evaluate
    from ..config import EvalConfig

    if not datasets:
        return {}
    cfg = EvalConfig(tuple(datasets), seqlen, max_windows, batch_size)
    bars: dict[str, tqdm] = {}

    def progress(ds: str, i: int, n: int) -> None:
        bar = bars.get(ds)
        if bar is None:
            bar = bars[ds] = tqdm(total=n, desc=f"{label} {ds}", unit="win", leave=False)
        bar.n = i
        bar.refresh()

    try:
        return evaluate(model, tokenizer, cfg, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
