"""``prunekit prune``: compress a model, compare perplexity before/after, save atomically."""

from __future__ import annotations

import argparse

import time

from ..registry import ALLOCATORS, METHODS, REFINERS
from ._tasks import add_task_args, prepare, run_with_progress, task_settings
from .common import UserError, add_eval_args, add_model_args, fmt_ppl, parse_options, run_perplexity, setup_threads, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and measure what it cost",
                       description="Prune every linear of every decoder block (or a selection) and report "
                                   "dense vs pruned perplexity.")
    add_model_args(p)
    p.add_argument("--method", default=None, choices=METHODS.names(), help="pruning criterion (default wanda)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights to remove, in [0, 1) (default 0.5; implied by an N:M pattern)")
    p.add_argument("--pattern", default=None, help="unstructured (default) or N:M, e.g. 2:4, 4:8")
    p.add_argument("--allocation", default=None, choices=ALLOCATORS.names(), help="layerwise sparsity allocation")
    p.add_argument("--alloc-option", action="append", metavar="K=V", help="allocation option (repeatable)")
    p.add_argument("--option", action="append", metavar="K=V", help="method option, e.g. percdamp=0.01 (repeatable)")
    p.add_argument("--include", action="append", metavar="REGEX", help="only prune linears whose name matches")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="never prune linears whose name matches")
    p.add_argument("--calib", default=None, help="calibration dataset name or .txt/.jsonl file (default austen)")
    p.add_argument("--text-field", default=None, help="JSONL field holding the text (default text)")
    p.add_argument("--packing", action="store_true", default=None,
                   help="cut windows from concatenated documents (for short documents)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration sequences (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration sequence length in tokens (default 2048)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration sequences per block forward (default 8)")
    p.add_argument("--seed", type=int, default=None, help="calibration sampling seed (default 0)")
    p.add_argument("--config", default=None, help="YAML PruneConfig; command-line flags you give override it")
    p.add_argument("--refine", default=None, choices=REFINERS.names(),
                   help="post-step after each layer is pruned, e.g. dsnot (training-free mask refinement)")
    p.add_argument("--refine-option", action="append", metavar="K=V",
                   help="refiner option, e.g. max_cycles=50 or skip= (repeatable)")
    p.add_argument("--out", default=None, help="save the pruned model here (atomic; safetensors + report)")
    p.add_argument("--merge-lowrank", action="store_true",
                   help="save low-rank factors merged into dense weights (plain transformers; no size saving)")
    p.add_argument("--save-format", default="dense", choices=["dense", "compressed"],
                   help="dense: plain HF folder (default); compressed: non-zeros + bitmask / N:M indices, "
                        "as small as the sparsity, reloaded by prunekit.load_model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-dense-eval", action="store_true", help="skip the dense perplexity baseline")
    p.add_argument("--json", default=None, help="also write the report JSON to this file")
    add_eval_args(p)
    add_task_args(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """PruneConfig from ``--config`` YAML (if any) overridden by the flags actually given."""
    from ..config import CalibConfig, PruneConfig, load_yaml, to_dict

    base = to_dict(load_yaml(args.config)) if args.config else {}
    calib = dict(base.pop("calib", {}))
    for key in ("method", "sparsity", "pattern", "allocation"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if "sparsity" not in base and ":" in str(base.get("pattern", "")):
        base["sparsity"] = None  # implied by the N:M pattern
    if args.include:
        base["include"] = args.include
    if args.exclude:
        base["exclude"] = args.exclude
    base["method_options"] = {**base.get("method_options", {}), **parse_options(args.option, "method")}
    base["allocation_options"] = {**base.get("allocation_options", {}), **parse_options(args.alloc_option, "allocation")}
    if args.refine is not None:
        base["refine"] = args.refine
    base["refine_options"] = {**base.get("refine_options", {}), **parse_options(args.refine_option, "refine")}
    for key, flag in (("dataset", "calib"), ("nsamples", "nsamples"), ("seqlen", "seqlen"), ("seed", "seed"),
                      ("batch_size", "batch_size"), ("text_field", "text_field"), ("packing", "packing")):
        if getattr(args, flag) is not None:
            calib[key] = getattr(args, flag)
    return PruneConfig(**base, calib=CalibConfig(**calib))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..api import prune
    from ..calibration import peak_rss_mb
    from ..export import check_output_dir, save_model
    from ..models import load_model

    setup_threads(args)
    config = build_config(args)  # validate everything cheap before loading anything
    from ..data import get_dataset

    for name in [config.calib.dataset, *args.eval_datasets]:
        get_dataset(name, text_field=config.calib.text_field)  # unknown names fail now, not after pruning
    if args.out:
        check_output_dir(args.out, args.overwrite)
    eval_seqlen = args.eval_seqlen or config.calib.seqlen
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows={args.max_windows} must be >= 1")
    settings = task_settings(args, eval_seqlen, args.max_windows, args.eval_batch_size)
    tasks = prepare(args)  # bad task names / files fail before the model loads

    t0 = time.perf_counter()
    model, tok = load_model(args.model, args.dtype, args.device, args.trust_remote_code, getattr(args, "allow_pickle", False))
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"{args.device}) in {time.perf_counter() - t0:.1f}s")
    dense = {} if args.no_dense_eval else run_perplexity(model, tok, args.eval_datasets, eval_seqlen, args.max_windows,
                                                         args.eval_batch_size, "dense")
    dense_tasks = {} if args.no_dense_eval else run_with_progress(model, tok, tasks, settings, "dense")
    bar = tqdm(total=None, desc=f"{config.method} {config.pattern}", unit="block")

    def on_block(ev) -> None:
        bar.total = ev.total
        err = "" if ev.record.rel_error is None else f"err {ev.record.rel_error:.3f} "
        bar.set_postfix_str(f"{err}{ev.record.seconds:.1f}s {ev.record.peak_rss_mb:.0f}MB")
        bar.update(1)

    try:
        report = prune(model, config, tokenizer=tok, callback=on_block)
    finally:
        bar.close()
    pruned = run_perplexity(model, tok, args.eval_datasets, eval_seqlen, args.max_windows, args.eval_batch_size, "pruned")
    pruned_tasks = run_with_progress(model, tok, tasks, settings, "pruned")
    report.evaluation = {"dense": {k: v.to_dict() for k, v in dense.items()},
                         "pruned": {k: v.to_dict() for k, v in pruned.items()}}
    if tasks:
        report.evaluation["tasks"] = {"dense": {k: r.to_dict() for k, r in dense_tasks.items()},
                                      "pruned": {k: r.to_dict() for k, r in pruned_tasks.items()}}
    report.extra["model"] = args.model
    report.extra["dtype"] = args.dtype
    print_summary(report, dense, pruned, dense_tasks, pruned_tasks)
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if args.out:
        from ..export import save_folder

        out, how = save_folder(model, tok, args.out, report.to_dict(), args.overwrite, args.merge_lowrank,
                               args.save_format)
        print(f"saved to {out} ({how})")
    return 0


def print_summary(report, dense: dict, pruned: dict, dense_tasks: dict | None = None,
                  pruned_tasks: dict | None = None) -> None:
    from ..calibration import peak_rss_mb
    from ._tasks import fmt_metric

    rows = []
    for ds, res in pruned.items():
        d = dense.get(ds)
        rows.append([f"{ds} ppl (seqlen {res.seqlen}, {res.windows} win, {res.tokens} tok)",
                     fmt_ppl(d.ppl if d else None), fmt_ppl(res.ppl)])
    for spec, res in (pruned_tasks or {}).items():
        d = (dense_tasks or {}).get(spec)
        for m, v in res.metrics.items():
            ppl = res.family == "perplexity"
            rows.append([f"{spec} {m} (n={res.n})", fmt_metric(d.metrics[m], d.stderr.get(m), ppl) if d else "-",
                         fmt_metric(v, res.stderr.get(m), ppl)])
    rows.append(["sparsity of pruned linears", "0.0000", f"{report.sparsity:.4f}"])
    rows.append([f"target ({report.method}, {report.pattern}, {report.allocation})", "", f"{report.target_sparsity:.4f}"])
    rows.append(["prune time (s)", "", f"{report.seconds:.1f}"])
    for ds, res in pruned.items():
        d = dense.get(ds)
        rows.append([f"{ds} eval speed (tok/s)", f"{d.tokens_per_s:.0f}" if d else "-", f"{res.tokens_per_s:.0f}"])
    rows.append(["peak RSS (MB)", "", f"{peak_rss_mb():.0f}"])
    print(table(rows, ["", "dense", "pruned"]))



