"""Downstream tasks: multiple choice, factoid QA, arithmetic, perplexity suites, lm-eval bridge.

A task is chosen by a *spec* string:

* a registered name (``prunekit ls``): ``boolq``, ``piqa``, ``rte``, ``mmlu``, ``general_knowledge``,
  ``social_iqa``, ``qa_wikidata``, ``gsm8k``; options after a colon: ``mmlu:shots=0``,
  ``gsm8k:shots=8,max_new_tokens=128``, ``mmlu:subjects=anatomy+virology``;
* ``bigbench:NAME_OR_PATH`` — any BIG-bench ``task.json`` (by path, or a task folder under
  ``<data dir>/bigbench``);
* ``mc:FILE.jsonl`` / ``qa:FILE.jsonl`` / ``arith:FILE.jsonl`` — your own tasks (formats in
  docs/evaluation.md); options after a second colon, e.g. ``qa:facts.jsonl:shots=2``;
* ``ppl:DATASET`` — perplexity on a registered text dataset or a text file;
* ``lm_eval:NAME`` — an lm-evaluation-harness task (needs ``pip install lm-eval``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable

from ...options import coerce_kwargs, yaml_scalar
from ...registry import TASKS
from . import arithmetic, generation, multiple_choice  # noqa: F401  (self-registering)
from .base import Task, TaskResult, TaskSettings
from .lm_eval_bridge import LmEvalTask, lm_eval_available
from ...errors import ConfigError

log = logging.getLogger(__name__)

PREFIXES = ("bigbench", "mc", "qa", "arith", "ppl", "lm_eval")


def _options(text: str, spec: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"task option {item!r} in {spec!r} is not KEY=VALUE, e.g. mmlu:shots=0")
        out[key.strip()] = yaml_scalar(value)
    return out


def _split_path_options(rest: str, spec: str) -> tuple[str, dict]:
    # "file.jsonl:shots=2" → path, options (a Windows drive letter has no "=" after it)
    head, sep, tail = rest.rpartition(":")
    if sep and "=" in tail:
        return head, _options(tail, spec)
    return rest, {}


def _call(factory: Callable, spec: str, *args, **opts) -> Task:
    """``factory(*args, **opts)`` with the options checked and typed by the factory's signature."""
    skip = tuple(list(inspect.signature(factory).parameters)[: len(args)])  # the positional ones we pass
    return factory(*args, **coerce_kwargs(factory, opts, f"task {spec!r}", skip))


def get_task(spec: str, data_dir=None) -> Task:
    """The :class:`Task` a spec names (its data files are checked now, read lazily)."""
    if not spec or not str(spec).strip():
        raise ConfigError("empty task name; choose one of: " + ", ".join(TASKS.names()))
    spec = str(spec).strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXES:
        if not rest:
            raise ConfigError(f"task {spec!r} names no {prefix} target, e.g. {prefix}:NAME")
        if prefix == "lm_eval":
            return LmEvalTask(rest)
        if prefix == "ppl":
            from .perplexity_suite import PerplexityTask

            return PerplexityTask(rest, data_dir)
        path, opts = _split_path_options(rest, spec)
        if prefix == "bigbench":
            return _call(multiple_choice.bigbench_task, spec, path, data_dir, **opts)
        if prefix == "mc":
            return _call(multiple_choice.jsonl_mc_task, spec, path, **opts)
        if prefix == "qa":
            return _call(generation.jsonl_qa_task, spec, path, **opts)
        return _call(arithmetic.jsonl_arith_task, spec, path, **opts)
    name = prefix if sep else spec
    if name not in TASKS:
        raise ConfigError(
            f"unknown task {name!r}; choose one of: {', '.join(TASKS.names())}, or "
            "bigbench:NAME|PATH, mc:FILE.jsonl, qa:FILE.jsonl, arith:FILE.jsonl, ppl:DATASET, lm_eval:NAME"
        )
    return _call(TASKS.get(name), spec, data_dir, **(_options(rest, spec) if sep else {}))


def prepare_tasks(specs: list[str] | tuple[str, ...], data_dir=None) -> dict[str, Task]:
    """Resolve every spec and read its examples — all mistakes surface before a model is loaded."""
    dup = sorted({s for s in specs if list(specs).count(s) > 1})
    if dup:
        raise ConfigError(f"task(s) {dup} listed twice; name each task once")
    tasks: dict[str, Task] = {}
    for spec in specs:
        task = get_task(spec, data_dir)
        if hasattr(task, "examples"):
            task.examples()
        tasks[spec] = task
    return tasks


def run_tasks(model, tokenizer, tasks: dict[str, Task], settings: TaskSettings,
              progress: Callable[[str, int, int], None] | None = None) -> dict[str, TaskResult]:
    """Run prepared tasks in order; ``{spec: TaskResult}``."""
    out = {}
    for spec, task in tasks.items():
        cb = (lambda i, n, _s=spec: progress(_s, i, n)) if progress else None
        res = task.run(model, tokenizer, settings, settings.limit_for(spec), cb)
        log.info("%s: %s (n=%d, %.1fs)", spec, ", ".join(f"{k}={v:.4f}" for k, v in res.metrics.items()), res.n,
                 res.seconds)
        out[spec] = res
    return out


__all__ = ["PREFIXES", "Task", "TaskResult", "TaskSettings", "get_task", "lm_eval_available", "prepare_tasks",
           "run_tasks"]
