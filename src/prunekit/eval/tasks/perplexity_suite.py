"""Perplexity suites as tasks: ``ppl:DATASET`` for any registered text dataset or text file.

The numbers are :func:`prunekit.eval.perplexity` (non-overlapping windows of ``ppl_seqlen``
tokens, remainder dropped, ``exp`` of the mean token NLL), so they match ``prunekit eval``.
"""

from __future__ import annotations

import time

from ...data import get_dataset
from ..perplexity import perplexity
from .base import Task, TaskResult, TaskSettings


class PerplexityTask(Task):
    family = "perplexity"
    main_metric = "ppl"
    higher_is_better = False

    def __init__(self, dataset: str, data_dir=None) -> None:
        super().__init__(f"ppl:{dataset}")
        get_dataset(dataset, data_dir)  # unknown names and missing files fail now, not after loading a model
        self.dataset, self.data_dir = dataset, data_dir
        self._token_cache: dict = {}  # the text is tokenized once per task, however many models it scores

    def run(self, model, tokenizer, settings: TaskSettings, limit=None, progress=None) -> TaskResult:
        # only a --limit aimed at this task changes the window count (a global limit counts examples)
        windows = dict(settings.limits).get(self.name, settings.ppl_max_windows)
        t0 = time.perf_counter()
        r = perplexity(model, tokenizer, self.dataset, settings.ppl_seqlen, windows, settings.ppl_batch_size,
                       self.data_dir or settings.data_dir, progress, self._token_cache)
        return TaskResult(self.name, self.family, {"ppl": r.ppl, "nll": r.nll}, {"ppl": None, "nll": None}, r.windows,
                          "ppl", False, {"seqlen": r.seqlen, "windows": r.windows, "tokens": r.tokens,
                                         "protocol": "non-overlapping windows, remainder dropped"},
                          time.perf_counter() - t0, r.windows * r.seqlen, r.windows / max(r.seconds, 1e-9),
                          r.tokens_per_s)
