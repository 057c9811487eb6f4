"""Arguments and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import ConfigError
from ..pipeline.checks import check_json_path  # noqa: F401  (the subcommands' --json check)


def friendly(e: BaseException) -> str | None:
    """The one-line message for a user mistake or an I/O fault; ``None`` for a real bug (keeps its traceback).

    User mistakes are :class:`ConfigError` (the library raises it with the value and the fix).
    I/O faults (``OSError``) are named with their path, which the bare strerror lacks.
    """
    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, OSError):
        path = e.filename if e.filename is not None else None
        text = e.strerror or str(e)
        if path is not None:
            other = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
            return f"{text}: {path}{other}"
        return text
    return None


def check_out_folder(path, what: str = "--out") -> None:
    """Fail now if ``path`` cannot become a folder (it is a file, or its parent cannot be made)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{what} {str(out)!r} is a file; give a folder")
    parent = out if out.exists() else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(out)!r} cannot be created under {str(parent)!r}; choose another folder")


def check_save_space(out, model, spec: str, save_format: str = "dense", sparsity: float = 0.0,
                     structured: bool = False, linears: dict | None = None) -> None:
    """Before the work: fail in one line if the disk under ``out`` cannot hold what the save will write."""
    from ..formats import check_save_space as check

    check(out, model, spec, save_format, sparsity, structured, linears)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF folder, .gguf file, hub id (org/name) or alias (see `prunekit ls`)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"],
                   help="weights and activations dtype (default float32; bfloat16 measured ~1.5x faster on CPUs with "
                        "avx512_bf16/amx, slower without)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled .bin weights when a model has no safetensors (unpickling can run code)")
    p.add_argument("--data-dir", default=None, help="local dataset copies (default: $PRUNEKIT_DATA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice); "
                   "results are bit-reproducible for the same thread count")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-vv: debug)")


def options_epilog() -> str:
    """Every option of every method, allocation and refiner, from their declarations (for --help)."""
    from ..registry import ALLOCATORS, METHODS, REFINERS
    from .ls import option_lines

    lines = []
    for flag, reg in (("--option", METHODS), ("--alloc-option", ALLOCATORS), ("--refine-option", REFINERS)):
        for name in reg.names():
            opts = option_lines(reg.get(name), "    ")
            if opts:
                lines += [f"{flag} for {reg.kind} {name}:", *opts]
    return "\n".join(lines)


class DatasetList(argparse.Action):
    """``--eval none`` (or ``--eval`` alone) is the empty list: no perplexity, as the help says."""

    def __call__(self, parser, namespace, values, option_string=None):
        values = list(values or [])
        if any(v.lower() == "none" for v in values):
            if len(values) > 1:
                raise argparse.ArgumentError(self, f"'none' skips perplexity; it cannot go with datasets ({' '.join(values)})")
            values = []
        setattr(namespace, self.dest, values)


def add_eval_args(p: argparse.ArgumentParser, flag: str = "--eval", default: list[str] | None = None) -> None:
    p.add_argument(flag, dest="eval_datasets", nargs="*", default=default if default is not None else ["wikitext2"],
                   action=DatasetList, metavar="DATASET",
                   help="perplexity datasets (registered names or text files); none (or nothing) to skip")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window length (default: --seqlen)")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward pass (default 1)")


def setup_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (checked: a positive integer)."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads={n} is invalid: give a positive number of CPU threads, e.g. --threads 2")
    import torch

    torch.set_num_threads(n)


def load_from_args(args: argparse.Namespace):
    """``(model, tokenizer)`` from the model arguments every subcommand shares."""
    from ..formats import load_model

    return load_model(args.model, args.dtype, args.device, args.trust_remote_code, args.allow_pickle)


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
                   label: str, data_dir=None, token_cache: dict | None = None, prompt: int = 0) -> dict:
    """Perplexity on each dataset with a progress bar; returns ``{dataset: PerplexityResult}``."""
    from tqdm import tqdm

    from ..api import evaluate
    from ..config import EvalConfig

    if not datasets:
        return {}
    cfg = EvalConfig(tuple(datasets), seqlen, max_windows, batch_size, prompt)
    bars: dict[str, tqdm] = {}

    def progress(ds: str, i: int, n: int) -> None:
        bar = bars.get(ds)
        if bar is None:
            bar = bars[ds] = tqdm(total=n, desc=f"{label} {ds}", unit="win", leave=False)
        bar.n = i
        bar.refresh()

    try:
        return evaluate(model, tokenizer, cfg, data_dir, progress, token_cache)
    finally:
        for bar in bars.values():
            bar.close()
