"""``prunekit recover``: train a compressed model back towards its dense teacher, keep the compression."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from ..pipeline.run import checkpoint_dir
from ._control import add_control_arg, check_control, run_control
from ._tasks import add_task_args, prepare, run_with_progress, task_settings
from ..errors import ConfigError
from .common import (add_eval_args, add_model_args, check_json_path, check_save_space, fmt_ppl, run_perplexity,
                     setup_threads, table)


def add_recover_args(p: argparse.ArgumentParser) -> None:
    """The training flags (shared with ``prune --recover``), one per RecoverConfig field that carries ``cli``
    metadata; every default, help text and choice lives in RecoverConfig."""
    from ..recover import RecoverConfig

    g = p.add_argument_group("recovery (docs/recover.md)")
    add_field_args(g, RecoverConfig)
    g.add_argument("--restart", action="store_true", help="discard an existing checkpoint instead of resuming it")


def add_field_args(group, cls) -> None:
    """A flag per field of dataclass ``cls`` with ``cli`` metadata (help, choices, flag). Its argparse default
    is ``None`` so that a flag not given keeps the dataclass's own default."""
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("cli")
        if meta is not None:
            extra = {k: v for k, v in meta.items() if k != "flag"}
            group.add_argument(meta.get("flag", "--" + f.name.replace("_", "-")), dest=f.name, default=None,
                               **_flag_kind(f.default), **extra)


def _flag_kind(default) -> dict:
    """argparse's action, type and nargs for a field, read from its default."""
    if isinstance(default, bool):
        return {"action": "store_true"}
    if isinstance(default, tuple):
        return {"type": type(default[0]), "nargs": "+"}
    return {} if isinstance(default, str) else {"type": type(default)}


def field_values(cls, args: argparse.Namespace) -> dict:
    """The flags of ``add_field_args(…, cls)`` that were given, by field name (a list flag as a tuple)."""
    names = (f.name for f in dataclasses.fields(cls) if "cli" in f.metadata)
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return {n: tuple(v) if isinstance(v, list) else v for n, v in given.items()}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recover", help="train a compressed model back towards its dense teacher, keeping its zeros",
                       description="Distillation / fine-tuning after compression. Pruned weights stay exactly zero "
                                   "(full training with masked gradients, or LoRA merged through the mask); the "
                                   "model is evaluated before and after and saved atomically with a JSON report.")
    add_model_args(p)
    p.add_argument("--teacher", default=None, help="the dense model the student was compressed from")
    add_recover_args(p)
    p.add_argument("--out", required=True, help="save the recovered model here (atomic; safetensors + report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--json", default=None, help="also write the report JSON to this file")
    add_eval_args(p, default=["wikitext2"])
    p.set_defaults(eval_seqlen=1024)
    add_task_args(p)
    add_control_arg(p)
    p.set_defaults(func=run)


def build_recover_config(args: argparse.Namespace):
    from ..recover import RecoverConfig

    return RecoverConfig(**field_values(RecoverConfig, args))


def make_evaluator(tok, args, tasks, settings):
    """``model -> {"ppl": {...}, "tasks": {...}}`` with the CLI's progress bars."""
    def evaluate(model) -> dict:
        ppl = run_perplexity(model, tok, args.eval_datasets, args.eval_seqlen, args.max_windows, args.eval_batch_size,
                             "eval")
        res = run_with_progress(model, tok, tasks, settings, "tasks")
        return {"ppl": {k: v.to_dict() for k, v in ppl.items()}, "tasks": {k: r.to_dict() for k, r in res.items()}}

    return evaluate


class _Bar:
    """A tqdm bar opened at the first step, so a run refused before training prints only its error."""

    def __init__(self, total: int) -> None:
        self.total, self.bar = total, None

    def __call__(self, info) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="recover", unit="step")
        self.bar.n = info.step
        self.bar.set_postfix_str(f"loss {info.loss:.4f} lr {info.lr:.2e} {info.tokens_per_s:.0f} tok/s "
                                 f"ETA {info.eta_s / 60:.1f} min")
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(total: int):
    bar = _Bar(total)
    return bar, bar


def prior_report(model_spec: str) -> dict | None:
    """The compression report saved beside the student (``prunekit prune --out``), if any."""
    from ..formats import read_report

    rep = read_report(model_spec)
    if rep is None:
        return None
    keep = ("method", "target_sparsity", "pattern", "allocation", "summary", "config", "evaluation")
    return {k: rep[k] for k in keep if k in rep}


def run(args: argparse.Namespace) -> int:
    from ..formats import reserve_output

    setup_threads(args)
    cfg = build_recover_config(args)  # every bad value fails here, before anything loads
    with reserve_output(args.out, args.overwrite):  # checked, and held against a second run, from now on
        return _run(args, cfg)


def _run(args: argparse.Namespace, cfg) -> int:
    from ..data import get_dataset
    from ..formats import load_model
    from ..recover.data import load_documents

    check_json_path(args.json)
    for name in args.eval_datasets:
        get_dataset(name, args.data_dir)
    load_documents(cfg)  # unknown / missing / test-split training text fails now
    if cfg.needs_teacher and not args.teacher:
        raise ConfigError("distillation needs --teacher DENSE (the model the student was compressed from); or train on "
                        "next-token loss alone with --kl-weight 0 --ce-weight 1")
    check_control(args)
    if args.max_windows is not None and args.max_windows < 1:
        raise ConfigError(f"--max-windows={args.max_windows} must be >= 1")
    settings = task_settings(args, args.eval_seqlen, args.max_windows, args.eval_batch_size)
    tasks = prepare(args)
    ckpt = checkpoint_dir(args.out)
    if args.restart and ckpt.exists():
        shutil.rmtree(ckpt)

    if cfg.needs_teacher:  # the same vocabulary size is not the same tokenizer: compared before any weights load
        from ..formats.tokenizer_match import check_same_tokenizer

        check_same_tokenizer(args.model, args.teacher, args.trust_remote_code)
    t0 = time.perf_counter()
    student, tok = load_model(args.model, args.dtype, args.device, args.trust_remote_code, args.allow_pickle)
    teacher = None
    if cfg.needs_teacher:
        teacher, _ = load_model(args.teacher, "float32", args.device, args.trust_remote_code, args.allow_pickle)
    check_save_space(args.out, student, args.model)  # a disk too small for the result: found before training
    print(f"loaded {args.model}" + (f" and teacher {args.teacher}" if teacher is not None else "")
          + f" in {time.perf_counter() - t0:.1f}s; {cfg.steps} steps x {cfg.tokens_per_step} tokens")
    return train_and_save(args, cfg, student, teacher, tok, tasks, settings, ckpt, prior_report(args.model))


def train_and_save(args, cfg, student, teacher, tok, tasks, settings, ckpt: Path, prior: dict | None) -> int:
    """Recover, print the summary, save atomically, drop the checkpoint (shared with ``prune --recover``)."""
    from ..formats import save_with_thresholds  # a model carrying activation thresholds keeps them
    from ..recover import recover

    bar, on_step = progress_bar(cfg.steps)
    evaluator = make_evaluator(tok, args, tasks, settings) if (args.eval_datasets or tasks) else None
    try:
        report = recover(student, teacher, tok, cfg, checkpoint_dir=ckpt if cfg.checkpoint_every else None,
                         callback=on_step, evaluate=evaluator)
    except KeyboardInterrupt:
        args.interrupted_note = interrupted_note(ckpt if cfg.checkpoint_every else None, "rerun the same command")
        raise
    finally:
        bar.close()
    out_report = {"recover": report.to_dict(), "model": args.model, "teacher": getattr(args, "teacher", None),
                  "compression": prior, "command": ["prunekit", *sys.argv[1:]]}
    print_summary(report)
    if getattr(args, "control", False):  # before the save: the report carries the control
        out_report["control"] = run_control(args, cfg, teacher, tok, evaluator, report, progress_bar)
    out, how = save_with_thresholds(student, tok, args.out, out_report, args.overwrite)
    if args.json:  # after the model: a report problem must not lose a finished training
        Path(args.json).write_text(json.dumps(out_report, indent=2, default=str))
    if ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)
    print(f"saved to {out} ({how})")
    return 0 if report.masks_kept else 1


def interrupted_note(ckpt: Path | None, how: str) -> str:
    """What an interrupted recovery leaves: the model is not saved; say whether a checkpoint resumes it."""
    if ckpt is not None and (ckpt / "state.pt").is_file():
        return f"the model was not saved; the training checkpoint in {ckpt} is kept: {how} to resume from it"
    hint = "" if ckpt is not None else " (--checkpoint-every N makes training resumable)"
    return f"nothing was saved and no training checkpoint was written yet{hint}"


def print_summary(report) -> None:
    from ._tasks import fmt_metric

    ev = report.evaluation
    rows = []
    for ds, after in ev.get("after", {}).get("ppl", {}).items():
        before = ev.get("before", {}).get("ppl", {}).get(ds)
        rows.append([f"{ds} ppl (seqlen {after['seqlen']}, {after['windows']} win)",
                     fmt_ppl(before["ppl"] if before else None), fmt_ppl(after["ppl"])])
    for spec, after in ev.get("after", {}).get("tasks", {}).items():
        before = ev.get("before", {}).get("tasks", {}).get(spec)
        for m, v in after["metrics"].items():
            b = before["metrics"].get(m) if before else None
            rows.append([f"{spec} {m} (n={after['n']})", fmt_metric(b, before["stderr"].get(m) if before else None),
                         fmt_metric(v, after["stderr"].get(m))])
    vb, va = report.validation_before, report.validation_after
    rows.append([f"held-out {report.data['name']} ppl ({vb['tokens']} tok)", fmt_ppl(vb["ppl"]), fmt_ppl(va["ppl"])])
    if "kl" in va:
        rows.append(["held-out KL to teacher (nats/token)", f"{vb['kl']:.4f}", f"{va['kl']:.4f}"])
    if report.lora:
        rows.append(["held-out ppl, LoRA merged WITHOUT the mask (dense)", "", fmt_ppl(report.lora["validation_unmasked"]["ppl"])])
    rows.append(["sparsity of decoder linears", f"{report.sparsity_before['sparsity']:.4f}",
                 f"{report.sparsity_after['sparsity']:.4f}" + ("" if report.masks_kept else " (MASK BROKEN)")])
    act = report.activation
    if act:
        new = f"{act['sparsity']:.4f} (re-calibrated)" if act["recalibrated"] else "(kept as trained with)"
        rows.append([f"{act['method']} activation sparsity (target {act['target']:.2f}): thresholds trained with",
                     f"{act['trained_thresholds_sparsity']:.4f}", new])
    rows.append(["training tokens / steps", "", f"{report.tokens} / {report.steps}"])
    rows.append(["training time (s) / tok/s", "", f"{report.seconds:.0f} / {report.tokens_per_s:.0f}"])
    rows.append(["optimizer state (MB) / peak RSS (MB)", "",
                 f"{report.optimizer_state_bytes / 2**20:.0f} / {report.peak_rss_mb:.0f}"])
    print(table(rows, ["", "before", "after"]))


# -- `prunekit prune ... --recover`: the chained step ----------------------------------------------
def add_chain_args(p: argparse.ArgumentParser) -> None:
    """``--recover`` / ``--recover-option`` for ``prune`` (prune's own --seqlen/--seed stay calibration's)."""
    p.add_argument("--recover", action="store_true",
                   help="after pruning, distill from the dense model keeping the zeros (docs/recover.md)")
    p.add_argument("--recover-option", action="append", metavar="K=V",
                   help="a RecoverConfig setting for --recover, e.g. tokens=262144, data=austen, optimizer=spam "
                        "(repeatable)")


def _yaml_values(items: list[str] | None) -> dict:
    """``["tokens=65536", "betas=[0.9, 0.95]"]`` → typed values (RecoverConfig checks them)."""
    import yaml

    from ..options import parse_pairs, yaml_scalar

    out = {}
    for key, value in parse_pairs(items, "recover").items():
        try:
            out[key] = yaml_scalar(value) if value else value
        except yaml.YAMLError:
            raise ConfigError(f"--recover-option {key}={value!r} is not a value (a number, word or [list])") from None
    return out


def chain_config(args: argparse.Namespace):
    """The RecoverConfig of ``prune --recover`` (``None`` without it), validated before any work."""
    from ..recover import RecoverConfig

    opts = _yaml_values(getattr(args, "recover_option", None))
    if not getattr(args, "recover", False):
        if opts:
            raise ConfigError("--recover-option given without --recover")
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(RecoverConfig)}
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise ConfigError(f"--recover-option {unknown[0]!r} is not a recovery setting; choose from: {', '.join(sorted(defaults))}")
    for key, value in opts.items():  # a lone value for a list setting (hidden_layers=-2) is a list of one
        if isinstance(defaults[key], tuple) and not isinstance(value, (list, tuple)):
            opts[key] = [value]
    return RecoverConfig(**opts)  # its training text is read by the pipeline, before the model loads
