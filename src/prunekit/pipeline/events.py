"""How a run tells what it is doing: :class:`Events`. The library's own logs; the CLI's prints and draws bars.

Every method has a default here that logs (or does the work quietly), so a Python caller passes
nothing, or overrides only what it wants to see.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger("prunekit.pipeline")


class Events:
    """Hooks :func:`prunekit.pipeline.run` calls as it goes, in this order (those that apply)."""

    def loaded(self, spec, model, seconds: float) -> None:
        """The model is in memory (not called when streaming)."""
        log.info("loaded %s (%.1fM params) in %.1fs", spec.model, sum(p.numel() for p in model.parameters()) / 1e6,
                 seconds)

    def streaming(self, spec) -> None:
        """The model stays on disk and is walked one block at a time."""
        log.info("streaming %s one block at a time: its weights stay on disk", spec.model)

    def perplexity(self, model, tokenizer, spec, label: str, token_cache: dict) -> dict:
        """Score ``model`` on ``spec.eval_datasets`` in memory; ``{dataset: PerplexityResult}``."""
        from ..api import evaluate
        from ..config import EvalConfig

        if not spec.eval_datasets:
            return {}
        cfg = EvalConfig(spec.eval_datasets, spec.seqlen, spec.max_windows, spec.eval_batch_size)
        out = evaluate(model, tokenizer, cfg, spec.data_dir, None, token_cache)
        for ds, res in out.items():
            log.info("%s %s: ppl %.3f", label, ds, res.ppl)
        return out

    def streamed_perplexity(self, label: str, dataset: str, result) -> None:
        """One dataset scored on the streamed model."""
        log.info("%s %s: ppl %.3f (%d windows, streamed)", label, dataset, result.ppl, result.windows)

    def tasks(self, model, tokenizer, tasks: dict, settings, label: str) -> dict:
        """Score prepared ``tasks``; ``{spec: TaskResult}``."""
        from ..eval.tasks import run_tasks

        return run_tasks(model, tokenizer, tasks, settings) if tasks else {}

    @contextlib.contextmanager
    def compressing(self, method: str, pattern: str) -> Iterator[Callable | None]:
        """Around the prune; yields the per-block callback (a :class:`~prunekit.calibration.BlockEvent`)."""
        yield lambda ev: log.debug("block %d/%d done", ev.index + 1, ev.total)

    @contextlib.contextmanager
    def sparsifying_activations(self, config) -> Iterator[Callable | None]:
        """Around the activation-threshold calibration; yields its per-block callback."""
        yield None

    @contextlib.contextmanager
    def recovering(self, steps: int) -> Iterator[Callable | None]:
        """Around the recovery training; yields its per-step callback."""
        yield None

    def evaluated(self, result) -> None:
        """Dense and compressed scores are known (in memory: before recovery and the save; streamed: after it)."""
        for ds, res in result.compressed.items():
            d = result.dense.get(ds)
            log.info("%s ppl: dense %s, compressed %.3f", ds, "-" if d is None else f"{d.ppl:.3f}", res.ppl)

    def recover_interrupted(self, checkpoint: Path | None) -> None:
        """Recovery was interrupted; ``checkpoint``: where its resumable state is, if any."""
        log.warning("recovery interrupted; checkpoint: %s", checkpoint)

    def recovered(self, report, perplexity: dict) -> None:
        """Recovery finished; ``perplexity``: the recovered model's scores."""
        for ds, r in perplexity.items():
            log.info("%s ppl after recovery: %.3f", ds, r.ppl)

    def saved(self, out: Path, how: str) -> None:
        """The folder is in place."""
        log.info("saved to %s (%s)", out, how)
