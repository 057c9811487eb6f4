"""``prunekit prune``: compress a model, compare perplexity before/after, save atomically."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from ..errors import ConfigError
from ..families import allocation_names
from ..formats import SAVE_FORMATS
from ..registry import METHODS, REFINERS, STRUCTURED
from ._tasks import add_task_args, prepare, run_with_progress, task_settings
from .common import (add_eval_args, add_model_args, check_json_path, check_save_space, fmt_ppl, load_from_args,
                     options_epilog, run_perplexity, setup_threads, table)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and measure what it cost",
                       description="Prune every linear of every decoder block (or a selection) and report "
                                   "dense vs pruned perplexity.",
                       epilog=options_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--method", default=None, choices=sorted(set(METHODS.names()) | set(STRUCTURED.names())),
                   help="pruning criterion (default wanda; with a structured pattern: slimgpt for "
                        "channels/heads/width, shortgpt for blocks/ffn)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights to remove, in [0, 1) (default 0.5; implied by an N:M pattern); "
                        "structured: fraction of the selected decoder-linear weights removed")
    p.add_argument("--pattern", default=None, help="unstructured (default), N:M (2:4, 4:8), or structured: channels, "
                                                   "heads, width, blocks, ffn (the model gets smaller)")
    p.add_argument("--allocation", default=None, choices=allocation_names(), help="layerwise sparsity allocation")
    p.add_argument("--alloc-option", action="append", metavar="K=V", help="allocation option (repeatable)")
    p.add_argument("--option", action="append", metavar="K=V", help="method option, e.g. percdamp=0.01 (repeatable)")
    p.add_argument("--width-multiple", type=int, default=None, metavar="N",
                   help="channels/heads/width: remove FFN channels in multiples of N (default: 256 where it divides "
                        "the FFN widths, so every llama.cpp quantization can hold the pruned model; else 32)")
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
    p.add_argument("--save-format", default="dense", choices=list(SAVE_FORMATS),
                   help="dense: plain HF folder (default); compressed: non-zeros + bitmask / N:M indices, "
                        "as small as the sparsity, reloaded by prunekit.load_model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-dense-eval", action="store_true", help="skip the dense perplexity baseline")
    p.add_argument("--json", default=None, help="also write the report JSON to this file")
    p.add_argument("--offload", choices=["auto", "none", "disk"], default="auto",
                   help="disk: keep the weights on disk and work one decoder block at a time (peak memory: one "
                        "block + activations); auto (default): only when the model would not fit in memory")
    add_eval_args(p)
    add_task_args(p)
    from ._activation import add_activation_args
    from .recover import add_chain_args

    add_activation_args(p)

    add_chain_args(p)
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
    if getattr(args, "width_multiple", None) is not None:
        if str(base.get("pattern")) not in ("channels", "heads", "width"):
            raise ConfigError(f"--width-multiple applies to --pattern channels, heads or width (the FFN width is "
                              f"chosen there), not {base.get('pattern') or 'unstructured'!r}")
        base["method_options"]["multiple"] = args.width_multiple
    base["allocation_options"] = {**base.get("allocation_options", {}), **parse_pairs(args.alloc_option, "allocation")}
    if args.refine is not None:
        base["refine"] = args.refine
    base["refine_options"] = {**base.get("refine_options", {}), **parse_pairs(args.refine_option, "refine")}
    for key, flag in (("dataset", "calib"), ("nsamples", "nsamples"), ("seqlen", "seqlen"), ("seed", "seed"),
                      ("batch_size", "batch_size"), ("text_field", "text_field"), ("packing", "packing")):
        if getattr(args, flag) is not None:
            calib[key] = getattr(args, flag)
    return PruneConfig(**base, calib=CalibConfig(**calib))


def _check_inputs(args: argparse.Namespace):
    """Everything that can be checked without the model, before it is loaded.

    The compression family's handler (its components built, once for the whole run) is kept in
    ``args.compression``; ``None`` when only activations are sparsified."""
    from ..data import get_dataset
    from ..families import prepare
    from ..formats import check_output_dir

    from ._activation import activation_config, weight_pruning_requested

    setup_threads(args)
    config = build_config(args)
    args.act_config = activation_config(args, config.calib)  # None without --activation-sparsity
    args.compression = None
    if not weight_pruning_requested(args):
        config = None  # --activation-sparsity alone: the weights stay dense
    else:
        args.compression = prepare(config)  # names, options and method/pattern compatibility
    calib = config.calib if config is not None else args.act_config.calib
    for name in [calib.dataset, *args.eval_datasets]:
        get_dataset(name, args.data_dir, text_field=calib.text_field)
    if args.out:
        check_output_dir(args.out, args.overwrite)
    check_json_path(args.json)
    if args.max_windows is not None and args.max_windows < 1:
        raise ConfigError(f"--max-windows={args.max_windows} must be >= 1")
    if args.act_config is not None and args.offload == "disk":
        raise ConfigError("--activation-sparsity calibrates the whole model in memory: drop --offload disk")
    if config is None:
        return None
    job = args.compression
    if args.save_format not in job.save_formats:
        raise ConfigError(job.save_format_refusal(args.save_format))
    if not job.streams and args.offload == "disk":
        raise ConfigError(f"--pattern {config.pattern} reshapes the model as a whole and needs it in memory: use "
                          "--offload none (or auto), or an unstructured / N:M pattern to stream")
    return config


def run(args: argparse.Namespace) -> int:
    from ..formats import reserve_output

    config = _check_inputs(args)
    with contextlib.ExitStack() as stack:
        if args.out:  # held from now until the save: a second run to the same --out fails at once
            stack.enter_context(reserve_output(args.out, args.overwrite))
        return _run(args, config)


def _run(args: argparse.Namespace, config) -> int:
    from ..api import prune
    from ._streamed import run_streamed, wants_streaming

    act = getattr(args, "act_config", None)
    eval_seqlen = args.eval_seqlen or (config.calib if config is not None else act.calib).seqlen
    settings = task_settings(args, eval_seqlen, args.max_windows, args.eval_batch_size)
    tasks = prepare(args)  # bad task names / files fail before the model loads
    from .recover import chain_after_prune, chain_config, dense_teacher

    recover_cfg = chain_config(args)  # --recover settings fail before the model loads too
    if wants_streaming(args):
        if act is not None:
            raise ConfigError(f"{args.model} does not fit in memory ({args.dtype}), and --activation-sparsity "
                              "calibrates the whole model in memory: use --dtype bfloat16 or a machine with more memory")
        if not args.compression.streams:
            raise ConfigError(f"{args.model} does not fit in memory ({args.dtype}), and --pattern {config.pattern} "
                              "needs the whole model in memory: use an unstructured / N:M pattern, which streams, "
                              "or a machine with more memory")
        if recover_cfg is not None:
            raise ConfigError("--recover trains the whole model in memory, so it cannot follow a streamed prune; "
                              "prune with --offload disk, then run prunekit recover where the model fits")
        return run_streamed(args, config, tasks, settings, _progress_bar(config), print_summary)
    t0 = time.perf_counter()
    model, tok = load_from_args(args)
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"{args.device}) in {time.perf_counter() - t0:.1f}s")
    _check_loaded(args, model, config, act, eval_seqlen)
    tokens: dict = {}
    evaluate = (lambda label: run_perplexity(model, tok, args.eval_datasets, eval_seqlen, args.max_windows,
                                             args.eval_batch_size, label, args.data_dir, tokens))
    dense = {} if args.no_dense_eval else evaluate("dense")
    dense_tasks = {} if args.no_dense_eval else run_with_progress(model, tok, tasks, settings, "dense")
    teacher = dense_teacher(model, recover_cfg)
    report = None
    if config is not None:
        report = _progress_bar(config)(lambda cb: prune(model, args.compression, tokenizer=tok, callback=cb,
                                                        data_dir=args.data_dir))  # the handler, as built
    if act is not None:
        from ._activation import activation_only_report, run_activation

        state = run_activation(model, tok, act, args)
        if report is None:
            report = activation_only_report(state, args.model, args.dtype)
        else:
            report.extra["activation"] = state.report
    pruned = evaluate("pruned")
    pruned_tasks = run_with_progress(model, tok, tasks, settings, "pruned")
    report.evaluation = {"dense": {k: v.to_dict() for k, v in dense.items()},
                         "pruned": {k: v.to_dict() for k, v in pruned.items()}}
    if tasks:
        report.evaluation["tasks"] = {"dense": {k: r.to_dict() for k, r in dense_tasks.items()},
                                      "pruned": {k: r.to_dict() for k, r in pruned_tasks.items()}}
    report.extra.update(model=args.model, dtype=args.dtype)
    print_summary(report, dense, pruned, dense_tasks, pruned_tasks)
    if recover_cfg is not None:
        chain_after_prune(args, recover_cfg, model, teacher, tok, report, tasks, settings)
    if args.out:  # the model first: a finished prune must not be lost to a bad report path
        from ..activation import save_with_thresholds  # the plain save when there are no thresholds

        out, how = save_with_thresholds(model, tok, args.out, report.to_dict(), args.overwrite, args.merge_lowrank,
                                        args.save_format)
        args.saved = out
        print(f"saved to {out} ({how})")
    if args.json:
        Path(args.json).expanduser().write_text(report.to_json())
    return 0


def _check_loaded(args: argparse.Namespace, model, config, act, eval_seqlen: int) -> None:
    """Everything about the loaded model that can fail, before the dense baseline and the prune.

    ``config`` is ``None`` when only activations are sparsified (``act``), the weights staying dense.
    """
    from ..eval import check_seqlen
    from ..models import check_finite

    check_finite(model)  # a NaN anywhere makes every number below meaningless
    if config is not None:
        job = args.compression
        linears = job.check(model)  # architecture x pattern, include/exclude, structured rounding
        if args.out:  # a disk too small for the result is found now, not after the prune
            check_save_space(args.out, model, args.model, args.save_format, config.sparsity, job.removes_units,
                             linears)
        if job.needs_calibration:  # named by the flag the user gave
            check_seqlen(model, config.calib.seqlen, "--seqlen")
    elif args.out:  # activation sparsity alone: the weights are saved as they are
        check_save_space(args.out, model, args.model, args.save_format, 0.0, False, {})
    if act is not None:
        from ..activation import check_activation

        check_activation(model, act)  # cats/chess need a gated MLP: before the dense baseline
        check_seqlen(model, act.calib.seqlen, "--seqlen")
    if args.eval_datasets:
        check_seqlen(model, eval_seqlen, "--eval-seqlen" if args.eval_seqlen else "--seqlen")


def _progress_bar(config):
    """``run(fn)``: calls ``fn(callback)`` with a per-block progress bar as the callback."""
    from tqdm import tqdm

    def run(fn):
        bar = tqdm(total=None, desc=f"{config.method} {config.pattern}", unit="block")

        def on_block(ev) -> None:
            bar.total = ev.total
            err = "" if ev.record.rel_error is None else f"err {ev.record.rel_error:.3f} "
            bar.set_postfix_str(f"{err}{ev.record.seconds:.1f}s {ev.record.peak_rss_mb:.0f}MB")
            bar.update(1)

        try:
            return fn(on_block)
        finally:
            bar.close()

    return run


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
    if report.method != "none":  # "none": activation sparsity alone, the weights are dense
        rows.append(["sparsity of pruned linears", "0.0000", f"{report.sparsity:.4f}"])
        rows.append([f"target ({report.method}, {report.pattern}, {report.allocation})", "",
                     f"{report.target_sparsity:.4f}"])
    if report.extra.get("activation"):
        from ._activation import summary_rows

        rows += summary_rows(report.extra["activation"])
    st = report.extra.get("structure")
    if st:  # structured: the model is physically smaller
        rows.append(["parameters (M)", f"{st['params_dense'] / 1e6:.3f}", f"{st['params'] / 1e6:.3f}"])
        rows.append(["blocks / widths uniform", "", f"{st['blocks']} / {st['uniform_widths']}"])
        save = st.get("save", {})
        if save.get("zero_bias_params"):
            rows.append(["parameters in a plain folder (M, incl. zero biases)", "", f"{save['params_saved'] / 1e6:.3f}"])
        rows.append(["loads with", "", save.get("loader", "-")])
    rows.append(["prune time (s)" if report.method != "none" else "calibration time (s)", "", f"{report.seconds:.1f}"])
    for ds, res in pruned.items():
        d = dense.get(ds)
        rows.append([f"{ds} eval speed (tok/s)", f"{d.tokens_per_s:.0f}" if d else "-", f"{res.tokens_per_s:.0f}"])
    rows.append(["peak RSS (MB)", "", f"{peak_rss_mb():.0f}"])
    print(table(rows, ["", "dense", "pruned"]))



