"""The steps the in-memory and the streamed run share: task settings, the report's scores, the report file."""

from __future__ import annotations

from pathlib import Path

from .spec import RunResult, RunSpec


def task_settings(spec: RunSpec):
    """``spec.task_settings``, or the defaults with the run's perplexity window."""
    from ..eval.tasks import TaskSettings

    if spec.task_settings is not None:
        return spec.task_settings
    return TaskSettings(None, (), 16, None, spec.seqlen, spec.max_windows, spec.eval_batch_size, spec.data_dir)


def record_evaluation(result: RunResult, spec: RunSpec, tasks: dict) -> None:
    """Dense and compressed scores into the report."""
    report = result.report
    report.evaluation = {"dense": {k: v.to_dict() for k, v in result.dense.items()},
                         "pruned": {k: v.to_dict() for k, v in result.compressed.items()}}
    if tasks:
        report.evaluation["tasks"] = {"dense": {k: r.to_dict() for k, r in result.dense_tasks.items()},
                                      "pruned": {k: r.to_dict() for k, r in result.tasks.items()}}


def write_report(spec: RunSpec, report) -> None:
    if spec.report_json:
        Path(spec.report_json).expanduser().write_text(report.to_json())
