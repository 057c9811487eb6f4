"""``run(spec)``: load → compress → evaluate → (recover) → save → report, in memory or streamed.

The one place the sequence lives: the CLI's ``prunekit prune`` (and ``--recover``) parses its flags
into a :class:`RunSpec`, calls :func:`run`, and prints what :class:`Events` tells it.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from .checks import check_before_loading, check_loaded, check_streamable, names, wants_streaming
from .events import Events
from .spec import RunResult, RunSpec
from .steps import record_evaluation, task_settings, write_report
from .streamed import run_streamed


def run(spec: RunSpec, events: Events | None = None) -> RunResult:
    """Run ``spec``: every check that needs no model first, then the work, streamed when ``spec.offload``
    says so (``auto``: when the model would not fit in memory), else in memory.

    A spec with a loaded model, calibration ids and prepared tasks (one cell of a sweep) loads,
    draws and prepares nothing, and saves nothing unless it names ``out``.

    Raises:
        ConfigError: a setting, file or model that cannot work, in one line, before the work it would spoil.
    """
    from ..formats import reserve_output

    events = events or Events()
    job = check_before_loading(spec)
    with contextlib.ExitStack() as stack:
        if spec.out:  # held from now until the save: a second run to the same folder fails at once
            stack.enter_context(reserve_output(spec.out, spec.overwrite))
        tasks = _prepare_tasks(spec)  # bad task names / files fail before the model loads
        if spec.recover is not None:
            from ..recover.data import load_documents

            load_documents(spec.recover)  # the training text too
        if wants_streaming(spec):
            check_streamable(spec, job, tasks)
            return run_streamed(spec, job, tasks, events)
        return run_in_memory(spec, job, tasks, events)


def _prepare_tasks(spec: RunSpec) -> dict:
    from ..eval.tasks import prepare_tasks

    if isinstance(spec.tasks, dict):  # prepared by the caller (a sweep prepares them once)
        return spec.tasks
    return prepare_tasks(list(spec.tasks), spec.data_dir) if spec.tasks else {}


def run_in_memory(spec: RunSpec, job, tasks: dict, events: Events) -> RunResult:
    """The whole model in memory: dense scores, compress, compressed scores, recover, save."""
    from ..formats import load_model

    settings = task_settings(spec)
    seconds: dict = {}
    if spec.loaded:
        model, tok = spec.model, spec.tokenizer
    else:
        t0 = time.perf_counter()
        model, tok = load_model(spec.model, spec.dtype, spec.device, spec.trust_remote_code, spec.allow_pickle)
        seconds["load"] = time.perf_counter() - t0
        events.loaded(spec, model, seconds["load"])
    check_loaded(spec, job, model)
    tokens: dict = {}
    result = RunResult(report=None, model=model, tokenizer=tok, seconds=seconds)
    if spec.dense_eval:
        result.dense = events.perplexity(model, tok, spec, "dense", tokens)
        result.dense_tasks = events.tasks(model, tok, tasks, settings, "dense")
    teacher = _dense_teacher(model, spec.recover)
    t0 = time.perf_counter()
    result.report = _compress(spec, job, model, tok, events)
    t1 = time.perf_counter()
    result.compressed = events.perplexity(model, tok, spec, "pruned", tokens)
    result.tasks = events.tasks(model, tok, tasks, settings, "pruned")
    seconds.update(compress=t1 - t0, evaluate=time.perf_counter() - t1)
    record_evaluation(result, spec, tasks)
    events.evaluated(result)
    if spec.recover is not None:
        _recover(spec, model, teacher, tok, result, tasks, settings, events)
    if spec.out:  # the model first: a finished prune must not be lost to a bad report path
        from ..formats import save_with_thresholds  # the plain save when there are no thresholds

        result.saved, result.saved_how = save_with_thresholds(model, tok, spec.out, result.report.to_dict(),
                                                              spec.overwrite, spec.merge_lowrank, spec.save_format)
        events.saved(result.saved, result.saved_how)
    write_report(spec, result.report)
    return result


def _compress(spec: RunSpec, job, model, tok, events: Events):
    """Compress the weights (``job``, the handler as built), then the activations (the activation family,
    calibrated on the compressed weights) if asked: one report, the thresholds' under ``extra["activation"]``."""
    from .. import api  # looked up at call time: hooks on prunekit.api.prune see this call
    from ..families import compress

    report = None
    if job is not None:
        with events.compressing(*names(spec.compression)) as on_block:
            report = api.prune(model, job, calib=spec.calib_ids, tokenizer=tok, callback=on_block,
                               data_dir=spec.data_dir)
    if spec.activation is not None:
        with events.sparsifying_activations(spec.activation) as on_block:
            activation = compress(model, spec.activation, tokenizer=tok, callback=on_block, data_dir=spec.data_dir)
        if report is None:  # the weights are as they were: the activation family's report, keys in the order
            report = activation  # reports have always had
            report.extra = {"model": spec.name, "dtype": spec.dtype, **report.extra}
        else:
            report.extra["activation"] = activation.extra["activation"]
    report.extra.update(model=spec.name, dtype=spec.dtype)
    return report


def checkpoint_dir(out) -> Path:
    """Recovery checkpoints live beside the output folder: ``OUT.checkpoint``."""
    o = Path(out).expanduser()
    return o.with_name(o.name + ".checkpoint")


def _dense_teacher(model, cfg):
    """A copy of the still-dense model to distill from (``None`` when no objective needs one)."""
    import copy

    return copy.deepcopy(model) if cfg is not None and cfg.needs_teacher else None


def _recover(spec: RunSpec, model, teacher, tok, result: RunResult, tasks: dict, settings, events: Events) -> None:
    """Recover the just-compressed ``model`` in place; its report goes to ``report.extra['recover']``."""
    import shutil

    from ..recover import recover  # looked up at call time (tests stand a fake in for it)

    cfg, report = spec.recover, result.report
    ckpt = checkpoint_dir(spec.out) if spec.out and cfg.checkpoint_every else None
    try:
        with events.recovering(cfg.steps) as on_step:
            rep = recover(model, teacher, tok, cfg, checkpoint_dir=ckpt, callback=on_step)
    except KeyboardInterrupt:
        events.recover_interrupted(ckpt)
        raise
    seqlen = spec.eval_seqlen or report.calibration.get("seqlen") or cfg.seqlen
    ppl = events.perplexity(model, tok, _with_seqlen(spec, seqlen), "recovered", {})
    res = events.tasks(model, tok, tasks, settings, "recovered")
    report.evaluation["recovered"] = {k: v.to_dict() for k, v in ppl.items()}
    if res:
        report.evaluation.setdefault("tasks", {})["recovered"] = {k: r.to_dict() for k, r in res.items()}
    report.extra["recover"] = rep.to_dict()
    if rep.activation:  # the report describes the thresholds saved: re-calibrated after training (or kept)
        from ..models.activation import state_of

        report.extra["activation"] = state_of(model).report
    result.recovered = ppl
    events.recovered(rep, ppl)
    if ckpt is not None and ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)


def _with_seqlen(spec: RunSpec, seqlen: int) -> RunSpec:
    import dataclasses

    return dataclasses.replace(spec, eval_seqlen=seqlen)
