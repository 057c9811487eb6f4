"""``prunekit eval``: perplexity of a model or a saved (pruned) folder."""

from __future__ import annotations

import argparse
import json
import time

from .common import add_eval_args, add_model_args, fmt_ppl, run_perplexity, setup_threads, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model or a saved folder",
                       description="Perplexity by the literature's protocol (non-overlapping windows, "
                                   "remainder dropped, mean token NLL).")
    add_model_args(p)
    add_eval_args(p, "--datasets")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--json", default=None, help="write the results as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import load_model

    setup_threads(args)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f}s")
    seqlen = args.eval_seqlen or args.seqlen
    res = run_perplexity(model, tok, args.eval_datasets, seqlen, args.max_windows, args.eval_batch_size, "eval")
    rows = [[ds, fmt_ppl(r.ppl), r.seqlen, r.windows, r.tokens, f"{r.tokens_per_s:.0f}"] for ds, r in res.items()]
    print(table(rows, ["dataset", "ppl", "seqlen", "windows", "tokens", "tok/s"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({ds: r.to_dict() for ds, r in res.items()}, f, indent=2)
    return 0
