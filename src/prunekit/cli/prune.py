"""``prunekit prune``: compress a model, compare perplexity before/after, save atomically."""

from __future__ import annotations

import argparse
import contextlib

from ..errors import ConfigError
from ..families import allocation_names
from ..formats import SAVE_FORMATS
from ..pipeline import Events
from ..registry import METHODS, REFINERS, STRUCTURED
from ._tasks import add_task_args, run_with_progress, task_settings
from .common import add_eval_args, add_model_args, fmt_ppl, options_epilog, run_perplexity, table


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


def build_spec(args: argparse.Namespace):
    """The :class:`~prunekit.pipeline.RunSpec` the flags ask for; every flag's own mistake fails here."""
    from ..pipeline import RunSpec
    from ._activation import activation_config, weight_pruning_requested
    from .recover import chain_config

    config = build_config(args)
    act = activation_config(args, config.calib)  # None without --activation-sparsity
    if not weight_pruning_requested(args):
        config = None  # --activation-sparsity alone: the weights stay dense
    eval_seqlen = args.eval_seqlen or (config.calib if config is not None else act.calib).seqlen
    return RunSpec(model=args.model, compression=config, activation=act, eval_datasets=tuple(args.eval_datasets),
                   eval_seqlen=args.eval_seqlen, max_windows=args.max_windows, eval_batch_size=args.eval_batch_size,
                   dense_eval=not args.no_dense_eval, tasks=tuple(args.tasks or ()),
                   task_settings=task_settings(args, eval_seqlen, args.max_windows, args.eval_batch_size),
                   out=args.out, save_format=args.save_format, overwrite=args.overwrite,
                   merge_lowrank=args.merge_lowrank, report_json=args.json, offload=args.offload,
                   recover=chain_config(args), dtype=args.dtype, device=args.device, threads=args.threads,
                   trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, data_dir=args.data_dir)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import run as run_pipeline

    run_pipeline(build_spec(args), Printed(args))
    return 0


class Printed(Events):
    """The pipeline's events as the command line shows them: lines on stdout, progress bars on stderr."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def loaded(self, spec, model, seconds: float) -> None:
        print(f"loaded {spec.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {spec.dtype}, "
              f"{spec.device}) in {seconds:.1f}s")

    def streaming(self, spec) -> None:
        print(f"streaming {spec.model} one block at a time ({spec.dtype}, {spec.device}): its weights stay on disk")

    def perplexity(self, model, tokenizer, spec, label: str, token_cache: dict) -> dict:
        return run_perplexity(model, tokenizer, list(spec.eval_datasets), spec.seqlen, spec.max_windows,
                              spec.eval_batch_size, label, spec.data_dir, token_cache)

    def streamed_perplexity(self, label: str, dataset: str, result) -> None:
        print(f"{label} {dataset}: ppl {result.ppl:.3f} ({result.windows} windows, streamed)")

    def tasks(self, model, tokenizer, tasks: dict, settings, label: str) -> dict:
        return run_with_progress(model, tokenizer, tasks, settings, label)

    def compressing(self, method: str, pattern: str):
        return _block_bar(f"{method} {pattern}", lambda ev: ev.record)

    def sparsifying_activations(self, config):
        return _block_bar(f"{config.method} activations {config.sparsity:g}", lambda ev: ev)

    @contextlib.contextmanager
    def recovering(self, steps: int):
        from .recover import progress_bar

        bar, on_step = progress_bar(steps)
        try:
            yield on_step
        finally:
            bar.close()

    def evaluated(self, result) -> None:
        print_summary(result.report, result.dense, result.compressed, result.dense_tasks,
                      result.tasks)

    def recover_interrupted(self, checkpoint) -> None:
        from .recover import interrupted_note

        self.args.interrupted_note = interrupted_note(checkpoint, "rerun the same command (the prune is redone, "
                                                                  "the same)")

    def recovered(self, report, perplexity: dict) -> None:
        from .recover import print_summary as print_recovery

        print_recovery(report)
        for ds, r in perplexity.items():
            print(f"{ds} ppl after recovery (seqlen {r.seqlen}, {r.windows} win): {fmt_ppl(r.ppl)}")

    def saved(self, out, how: str) -> None:
        self.args.saved = out
        print(f"saved to {out} ({how})")


@contextlib.contextmanager
def _block_bar(desc: str, record):
    """A per-block progress bar; yields its callback. ``record(event)``: the event's timing record."""
    from tqdm import tqdm

    bar = tqdm(total=None, desc=desc, unit="block")

    def on_block(ev) -> None:
        bar.total = ev.total
        rec = record(ev)
        err = "" if rec.rel_error is None else f"err {rec.rel_error:.3f} "
        bar.set_postfix_str(f"{err}{rec.seconds:.1f}s {rec.peak_rss_mb:.0f}MB")
        bar.update(1)

    try:
        yield on_block
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



