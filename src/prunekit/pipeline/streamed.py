"""The run for a model that does not fit in memory (``offload="disk"``, or ``"auto"`` when needed).

The same sequence as in memory — dense perplexity, prune, compressed perplexity, atomic save with the
report — with every step walking the model one decoder block at a time: the dense model is read from
its checkpoint block by block, each compressed block is written to the output shards as soon as it is
done, and the compressed model is evaluated from those shards.
"""

from __future__ import annotations

from pathlib import Path

from .checks import names
from .events import Events
from .steps import record_evaluation, task_settings, write_report
from .spec import RunResult, RunSpec


def _perplexity(lazy, tok, spec: RunSpec, label: str, tokens: dict, events: Events) -> dict:
    from ..eval import perplexity

    out = {}
    for ds in spec.eval_datasets:
        out[ds] = perplexity(lazy.model, tok, ds, spec.seqlen, spec.max_windows, spec.eval_batch_size, spec.data_dir,
                             token_cache=tokens)
        events.streamed_perplexity(label, ds, out[ds])
    return out


def run_streamed(spec: RunSpec, job, tasks: dict, events: Events) -> RunResult:
    """Stream ``spec`` (checked by :func:`~prunekit.pipeline.checks.check_streamable`) through ``job``."""
    from ..eval import check_seqlen
    from ..formats import atomic_folder, describe_streamed
    from ..formats.atomic import check_free_space
    from ..streaming import model_bytes_on_disk, open_lazy

    settings = task_settings(spec)
    lazy, tok = open_lazy(spec.model, spec.dtype, spec.device)
    events.streaming(spec)
    if spec.eval_datasets:
        check_seqlen(lazy.model, spec.seqlen, spec.seqlen_flag)
    needed = model_bytes_on_disk(spec.model, spec.dtype) or 0
    check_free_space(spec.out, needed)  # before the dense baseline; the save checks again before it writes
    tokens: dict = {}
    result = RunResult(report=None, streamed=True, tokenizer=tok)
    if spec.dense_eval:
        result.dense = _perplexity(lazy, tok, spec, "dense", tokens, events)
        result.dense_tasks = events.tasks(lazy.model, tok, tasks, settings, "dense")
    storage: list = []

    def write(tmp: Path) -> None:
        storage[:] = _prune_into(tmp, spec, job, lazy, tok, tasks, settings, tokens, result, events)

    result.saved = atomic_folder(spec.out, write, spec.overwrite, needed_bytes=needed)
    result.saved_how = f"written block by block while pruning: {describe_streamed(result.saved, *storage)}"
    events.evaluated(result)
    events.saved(result.saved, result.saved_how)
    write_report(spec, result.report)
    return result


def _prune_into(tmp: Path, spec: RunSpec, job, lazy, tok, tasks, settings, tokens, result: RunResult,
                events: Events) -> tuple[int, str]:
    """Prune block by block into ``tmp``, score what was written, finish the folder; its storage facts."""
    from ..formats import finish_streamed
    from ..streaming import open_lazy, prune_streamed

    with events.compressing(*names(spec.compression)) as on_block:
        result.report = prune_streamed(lazy, job, tmp, tok, callback=on_block, data_dir=spec.data_dir,
                                       save_format=spec.save_format)  # the handler, components built once
    tok.save_pretrained(tmp)
    pruned_lazy, _ = open_lazy(str(tmp), spec.dtype, spec.device)
    result.compressed = _perplexity(pruned_lazy, tok, spec, "pruned", tokens, events)
    result.tasks = events.tasks(pruned_lazy.model, tok, tasks, settings, "pruned")
    record_evaluation(result, spec, tasks)
    result.report.extra.update(model=spec.model, dtype=spec.dtype, offload="disk")
    return finish_streamed(tmp, result.report.to_dict(), lazy.model, spec.save_format)
