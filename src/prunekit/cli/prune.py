"""``prunekit prune``: compress a model, compare perplexity before/after, save atomically."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..errors import ConfigError
from ..registry import ALLOCATORS, METHODS, REFINERS, STRUCTURED
from ._tasks import add_task_args, prepare, run_with_progress, task_settings
from .common import (add_eval_args, add_model_args, fmt_ppl, load_from_args, options_epilog, run_perplexity,
                     setup_threads, table)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and measure what it cost",
                       description="Prune every linear of every decoder block (or a selection) and report "
                                   "dense vs pruned perplexity.",
                       epilog=options_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--method", default=None, choices=sorted(set(METHODS.names()) | set(STRUCTURED.names())),
                   help="pruning criterion (default wanda; with a structured pattern: flap for channels/heads/width, "
                        "shortgpt for blocks/ffn)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights to remove, in [0, 1) (default 0.5; implied by an N:M pattern); "
                        "structured: fraction of the selected decoder-linear weights removed")
    p.add_argument("--pattern", default=None, help="unstructured (default), N:M (2:4, 4:8), or structured: channels, "
                                                   "heads, width, blocks, ffn (the model gets smaller)")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-dense-eval", action="store_true", help="skip the dense perplexity baseline")
    p.add_argument("--json", default=None, help="also write the report JSON to this file")
    add_eval_args(p)
    add_task_args(p)
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """PruneConfig from ``--config`` YAML (if any) overridden by the flags actually given."""
    from ..config import CalibConfig, PruneConfig, load_yaml, to_dict
    from ..options import parse_pairs

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
    base["method_options"] = {**base.get("method_options", {}), **parse_pairs(args.option, "method")}
    base["allocation_options"] = {**base.get("allocation_options", {}), **parse_pairs(args.alloc_option, "allocation")}
    if args.refine is not None:
        base["refine"] = args.refine
    base["refine_options"] = {**base.get("refine_options", {}), **parse_pairs(args.refine_option, "refine")}
    for key, flag in (("dataset", "calib"), ("nsamples", "nsamples"), ("seqlen", "seqlen"), ("seed", "seed"),
                      ("batch_size", "batch_size"), ("text_field", "text_field"), ("packing", "packing")):
        if getattr(args, flag) is not None:
            calib[key] = getattr(args, flag)
    return PruneConfig(**base, calib=CalibConfig(**calib))


def check_json_path(path: str | None) -> None:
    """Fail now (not after the prune) if ``--json`` cannot be written."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"--json {path!r} is a folder; give a file name such as report.json")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--json {path!r}: folder {str(parent)!r} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"--json {path!r} is not writable; choose another path")


def _check_inputs(args: argparse.Namespace):
    """Everything that can be checked without the model, before it is loaded."""
    from ..api import build_components
    from ..data import get_dataset
    from ..export import check_output_dir

    setup_threads(args)
    config = build_config(args)
    build_components(config)  # names, options and method/pattern compatibility
    for name in [config.calib.dataset, *args.eval_datasets]:
        get_dataset(name, args.data_dir, text_field=config.calib.text_field)
    if args.out:
        check_output_dir(args.out, args.overwrite)
    check_json_path(args.json)
    if args.max_windows is not None and args.max_windows < 1:
        raise ConfigError(f"--max-windows={args.max_windows} must be >= 1")
    return config


def run(args: argparse.Namespace) -> int:
    from ..api import prune
    from ..eval import check_seqlen
    from ..models import check_finite

    config = _check_inputs(args)
    eval_seqlen = args.eval_seqlen or config.calib.seqlen
    settings = task_settings(args, eval_seqlen, args.max_windows, args.eval_batch_size)
    tasks = prepare(args)  # bad task names / files fail before the model loads
    t0 = time.perf_counter()
    model, tok = load_from_args(args)
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"{args.device}) in {time.perf_counter() - t0:.1f}s")
    check_finite(model)  # a NaN anywhere makes every number below meaningless
    from ..api import check_model

    check_model(model, config)  # architecture x pattern, include/exclude: before the dense baseline
    if args.eval_datasets:
        check_seqlen(model, eval_seqlen, "--eval-seqlen")
    tokens: dict = {}
    evaluate = (lambda label: run_perplexity(model, tok, args.eval_datasets, eval_seqlen, args.max_windows,
                                             args.eval_batch_size, label, args.data_dir, tokens))
    dense = {} if args.no_dense_eval else evaluate("dense")
    dense_tasks = {} if args.no_dense_eval else run_with_progress(model, tok, tasks, settings, "dense")
    report = _prune_with_progress(prune, model, tok, config, args.data_dir)
    pruned = evaluate("pruned")
    pruned_tasks = run_with_progress(model, tok, tasks, settings, "pruned")
    report.evaluation = {"dense": {k: v.to_dict() for k, v in dense.items()},
                         "pruned": {k: v.to_dict() for k, v in pruned.items()}}
    if tasks:
        report.evaluation["tasks"] = {"dense": {k: r.to_dict() for k, r in dense_tasks.items()},
                                      "pruned": {k: r.to_dict() for k, r in pruned_tasks.items()}}
    report.extra.update(model=args.model, dtype=args.dtype)
    print_summary(report, dense, pruned, dense_tasks, pruned_tasks)
    if args.out:  # the model first: a finished prune must not be lost to a bad report path
        from ..export.lowrank import save_compressed

        out, how = save_compressed(model, tok, args.out, report.to_dict(), args.overwrite, args.merge_lowrank)
        print(f"saved to {out} ({how})")
    if args.json:
        Path(args.json).expanduser().write_text(report.to_json())
    return 0


def _prune_with_progress(prune, model, tok, config, data_dir):
    from tqdm import tqdm

    bar = tqdm(total=None, desc=f"{config.method} {config.pattern}", unit="block")

    def on_block(ev) -> None:
        bar.total = ev.total
        err = "" if ev.record.rel_error is None else f"err {ev.record.rel_error:.3f} "
        bar.set_postfix_str(f"{err}{ev.record.seconds:.1f}s {ev.record.peak_rss_mb:.0f}MB")
        bar.update(1)

    try:
        return prune(model, config, tokenizer=tok, callback=on_block, data_dir=data_dir)
    finally:
        bar.close()


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
    st = report.extra.get("structure")
    if st:  # structured: the model is physically smaller
        rows.append(["parameters (M)", f"{st['params_dense'] / 1e6:.3f}", f"{st['params'] / 1e6:.3f}"])
        rows.append(["blocks / widths uniform", "", f"{st['blocks']} / {st['uniform_widths']}"])
        save = st.get("save", {})
        if save.get("zero_bias_params"):
            rows.append(["parameters in a plain folder (M, incl. zero biases)", "", f"{save['params_saved'] / 1e6:.3f}"])
        rows.append(["loads with", "", save.get("loader", "-")])
    rows.append(["prune time (s)", "", f"{report.seconds:.1f}"])
    for ds, res in pruned.items():
        d = dense.get(ds)
        rows.append([f"{ds} eval speed (tok/s)", f"{d.tokens_per_s:.0f}" if d else "-", f"{res.tokens_per_s:.0f}"])
    rows.append(["peak RSS (MB)", "", f"{peak_rss_mb():.0f}"])
    print(table(rows, ["", "dense", "pruned"]))



