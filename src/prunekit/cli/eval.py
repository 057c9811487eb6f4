"""``prunekit eval``: perplexity and downstream tasks of a model or a saved (pruned) folder."""

from __future__ import annotations

import argparse
import json
import time

from ..pipeline.checks import check_streamable_tasks, wants_streaming
from ._tasks import add_task_args, prepare, print_results, run_with_progress, task_settings
from .common import (add_eval_args, add_model_args, check_json_path, fmt_ppl, load_from_args, run_perplexity,
                     setup_threads, table)

_DEFAULT_DATASETS = ["wikitext2"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model or a saved folder (perplexity, tasks)",
                       description="Perplexity by the literature's protocol (non-overlapping windows, "
                                   "remainder dropped, mean token NLL) and downstream tasks (--tasks): multiple "
                                   "choice by log-likelihood, factoid QA and GSM8K by greedy generation. Without "
                                   "--tasks the default is WikiText-2 perplexity; with --tasks, perplexity runs "
                                   "only on the --datasets you name.")
    add_model_args(p)
    add_eval_args(p, "--datasets", default=_DEFAULT_DATASETS)
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    add_task_args(p)
    p.add_argument("--prompt-tokens", type=int, default=0, metavar="N",
                   help="score only the tokens after each window's first N; under activation thresholds those N "
                        "are computed densely, as generation prefills a prompt (TEAL's protocol: half the "
                        "window). Default 0: every token scored and thresholded")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.add_argument("--offload", choices=["auto", "none", "disk"], default="auto",
                   help="disk: keep the weights on disk and evaluate one decoder block at a time (perplexity and "
                        "multiple-choice tasks); auto (default): only when the model would not fit in memory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration import peak_rss_mb

    setup_threads(args)
    if args.tasks and args.eval_datasets is _DEFAULT_DATASETS:
        args.eval_datasets = []  # tasks given: perplexity only where asked for
    seqlen = args.eval_seqlen or args.seqlen
    settings = task_settings(args, seqlen, args.max_windows, args.eval_batch_size)
    if args.eval_datasets:  # a bad --prompt-tokens fails before the model loads
        from ..config import EvalConfig

        EvalConfig(tuple(args.eval_datasets), seqlen, args.max_windows, args.eval_batch_size, args.prompt_tokens)
    tasks = prepare(args)  # bad task names / files fail before the model loads
    check_json_path(args.json)
    t0 = time.perf_counter()
    if wants_streaming(args):
        from ..streaming import open_lazy

        check_streamable_tasks(tasks)
        lazy, tok = open_lazy(args.model, args.dtype, args.device)
        model = lazy.model  # evaluation walks its blocks one at a time, reading each from disk
        print(f"streaming {args.model} one block at a time ({time.perf_counter() - t0:.1f}s to open)")
    else:
        model, tok = load_from_args(args)
        print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s")
        from ..models import check_finite

        check_finite(model)  # a NaN in any tensor (a norm too) is named here, not found as a NaN perplexity
    if args.eval_datasets:
        from ..eval import check_seqlen

        check_seqlen(model, seqlen, "--eval-seqlen" if args.eval_seqlen else "--seqlen")
    res = run_perplexity(model, tok, args.eval_datasets, seqlen, args.max_windows, args.eval_batch_size, "eval",
                         args.data_dir, prompt=args.prompt_tokens)
    if res:
        rows = [[ds, fmt_ppl(r.ppl), r.seqlen, r.windows, r.tokens, f"{r.tokens_per_s:.0f}"] for ds, r in res.items()]
        print(table(rows, ["dataset", "ppl", "seqlen", "windows", "tokens", "tok/s"]))
    task_res = run_with_progress(model, tok, tasks, settings, "eval")
    print_results(task_res)
    if args.json:
        out = {ds: r.to_dict() for ds, r in res.items()}
        if task_res:
            out["tasks"] = {k: r.to_dict() for k, r in task_res.items()}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    return 0
