"""``--tasks`` arguments and output shared by ``eval``, ``prune`` and ``sweep``."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import table


def add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("downstream tasks (docs/evaluation.md)")
    g.add_argument("--tasks", nargs="*", default=[], metavar="TASK",
                   help="tasks to score: registered names (boolq piqa rte mmlu qa_wikidata gsm8k general_knowledge "
                        "social_iqa; options as mmlu:shots=0), bigbench:NAME|PATH, mc:/qa:/arith:FILE.jsonl, "
                        "ppl:DATASET, lm_eval:NAME")
    g.add_argument("--limit", action="append", default=None, metavar="N|TASK=N",
                   help="score only the first N examples of every task, or of one task (repeatable)")
    g.add_argument("--task-batch-size", type=int, default=16,
                   help="contexts / prompts per forward pass for tasks (default 16)")
    g.add_argument("--max-length", type=int, default=None,
                   help="longest task sequence in tokens (default: model context, at most 2048)")


def parse_limits(items: list[str] | None) -> tuple[int | None, dict[str, int]]:
    """``["200", "mmlu=100"]`` → ``(200, {"mmlu": 100})``."""
    default, per = None, {}
    for item in items or []:
        key, sep, value = item.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"--limit {item!r} is not N or TASK=N, e.g. --limit 200 --limit mmlu=100") from None
        if n < 1:
            raise ConfigError(f"--limit {item!r}: the limit must be >= 1")
        if sep:
            per[key] = n
        else:
            default = n
    return default, per


def task_settings(args: argparse.Namespace, ppl_seqlen: int, ppl_max_windows: int | None, ppl_batch_size: int = 1):
    from ..eval.tasks import TaskSettings

    limit, per = parse_limits(args.limit)
    unknown = set(per) - set(args.tasks or [])
    if unknown:
        raise ConfigError(f"--limit names task(s) {sorted(unknown)} that are not in --tasks {args.tasks}")
    return TaskSettings(limit, tuple(per.items()), args.task_batch_size, args.max_length, ppl_seqlen, ppl_max_windows,
                        ppl_batch_size, getattr(args, "data_dir", None))


def prepare(args: argparse.Namespace) -> dict:
    """Resolve ``--tasks`` (and read their data) before any model is loaded."""
    from ..eval.tasks import prepare_tasks

    return prepare_tasks(list(args.tasks or []), getattr(args, "data_dir", None)) if args.tasks else {}


def run_with_progress(model, tokenizer, tasks: dict, settings, label: str) -> dict:
    """Run prepared tasks with one progress bar per task; ``{spec: TaskResult}``."""
    from tqdm import tqdm

    from ..eval.tasks import run_tasks

    if not tasks:
        return {}
    bars: dict = {}

    def progress(spec: str, i: int, n: int) -> None:
        bar = bars.get(spec)
        if bar is None:
            bar = bars[spec] = tqdm(total=n, desc=f"{label} {spec}", leave=False)
        bar.n = i
        bar.refresh()

    try:
        return run_tasks(model, tokenizer, tasks, settings, progress)
    finally:
        for bar in bars.values():
            bar.close()


def fmt_metric(value: float | None, stderr: float | None = None, ppl: bool = False) -> str:
    if value is None:
        return "-"
    if ppl:
        return f"{value:.3f}" if value < 1e4 else f"{value:.3e}"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def result_rows(results: dict) -> list[list[str]]:
    """One row per task and metric: task, metric, value ± stderr, n, examples/s, tokens/s."""
    rows = []
    for spec, r in results.items():
        for m, v in r.metrics.items():
            rows.append([spec, m, fmt_metric(v, r.stderr.get(m), r.family == "perplexity"), r.n,
                         f"{r.examples_per_s:.2f}", f"{r.tokens_per_s:.0f}"])
    return rows


def print_results(results: dict) -> None:
    if results:
        print(table(result_rows(results), ["task", "metric", "value ± stderr", "n", "examples/s", "tok/s"]))
