"""``lm_eval:NAME``: run an lm-evaluation-harness task on the (pruned) in-memory model.

Optional dependency (``pip install lm-eval``); the harness downloads its datasets from the
Hugging Face hub, so this path needs network access. Without the package, asking for an
``lm_eval:`` task fails before any model is loaded, with the install command.
"""

from __future__ import annotations

import importlib.util
import time

from .base import Task, TaskResult, TaskSettings
from ...errors import ConfigError

INSTALL_HINT = "pip install lm-eval"


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


class LmEvalTask(Task):
    family = "lm_eval"

    def __init__(self, name: str) -> None:
        if not name:
            raise ConfigError("lm_eval task name is empty: write --tasks lm_eval:NAME, e.g. lm_eval:hellaswag")
        if not lm_eval_available():
            raise ConfigError(f"task 'lm_eval:{name}' needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
        super().__init__(f"lm_eval:{name}")
        self.task_name = name

    def run(self, model, tokenizer, settings: TaskSettings, limit=None, progress=None) -> TaskResult:
        import lm_eval  # noqa: PLC0415 - optional dependency
        from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

        t0 = time.perf_counter()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=[self.task_name], limit=limit)
        res = out["results"].get(self.task_name)
        if res is None:
            raise ConfigError(f"lm-eval returned no results for {self.task_name!r} (got {sorted(out['results'])})")
        metrics, stderr = {}, {}
        for key, value in res.items():
            metric, _, _filter = key.partition(",")
            if not isinstance(value, (int, float)) or metric == "alias":
                continue
            if metric.endswith("_stderr"):
                stderr[metric[: -len("_stderr")]] = float(value) if value == value else None
            else:
                metrics[metric] = float(value)
        main = "acc" if "acc" in metrics else next(iter(metrics))
        n = int(out.get("n-samples", {}).get(self.task_name, {}).get("effective", 0) or 0)
        secs = time.perf_counter() - t0
        return TaskResult(self.name, self.family, metrics, {k: stderr.get(k) for k in metrics}, n, main, True,
                          {"harness": getattr(lm_eval, "__version__", "?"), "limit": limit}, secs, 0,
                          n / secs if secs else 0.0, 0.0)
