"""``prunekit recover --control``: also train the dense model with the same recipe and print the honest ratio."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import fmt_ppl, table


def add_control_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", action="store_true",
                   help="also train a copy of the dense --teacher with the same recipe, text and tokens and report "
                        "recovered / tuned-dense next to recovered / dense (about doubles the time; docs/recover.md)")


def check_control(args: argparse.Namespace) -> None:
    """Before any work: the control needs the dense model and something to compare."""
    if not getattr(args, "control", False):
        return
    if not args.teacher:
        raise ConfigError("--control trains the dense model with the same recipe: pass it as --teacher DENSE")
    if not args.eval_datasets and not args.tasks:
        raise ConfigError("--control compares evaluations: keep --eval (e.g. --eval wikitext2 kjv) or add --tasks")


def run_control(args: argparse.Namespace, cfg, teacher, tok, evaluator, report, progress_bar) -> dict:
    """Train and evaluate a fresh copy of the dense model; print the comparison; return it for the report."""
    from ..formats import load_model
    from ..recover.control import compare, train_control

    print(f"control: training a copy of {args.teacher} with the same recipe ({cfg.steps} steps)")
    dense, _ = load_model(args.teacher, args.dtype, args.device, args.trust_remote_code, args.allow_pickle)
    bar, on_step = progress_bar(cfg.steps)
    try:
        ctrl = train_control(dense, teacher, tok, cfg, callback=on_step, evaluate=evaluator)
    finally:
        bar.close()
    rows = compare(report.evaluation, ctrl.evaluation)
    print(table([[r.metric, _fmt(r.one_shot), _fmt(r.recovered), _fmt(r.dense), _fmt(r.tuned_dense), r.vs_dense,
                  r.vs_tuned_dense] for r in rows],
                ["", "one-shot", "recovered", "dense", "tuned dense", "vs dense", "vs tuned dense"]))
    print("ratios are perplexity ratios (lower is better); tasks: tie = inside 2 standard errors of the difference")
    return {"report": ctrl.to_dict(), "comparison": [r.to_dict() for r in rows]}


def _fmt(x: float | None) -> str:
    return "-" if x is None else fmt_ppl(x) if x >= 1 else f"{x:.3f}"
