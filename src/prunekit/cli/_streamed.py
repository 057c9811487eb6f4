"""``prunekit prune`` for a model that does not fit in memory (``--offload disk``, or automatically).

The same pipeline as the in-memory path — dense perplexity, prune, compressed perplexity, atomic
save with the report — with every step walking the model one decoder block at a time: the dense
model is read from its checkpoint block by block, each compressed block is written to the output
shards as soon as it is done, and the compressed model is evaluated from those shards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError


def wants_streaming(args: argparse.Namespace) -> bool:
    """``--offload disk``: yes; ``none``: no; ``auto``: when the model would not fit in memory."""
    if args.offload == "disk":
        return True
    if args.offload == "none":
        return False
    from ..streaming import fits_in_memory

    return not fits_in_memory(args.model, args.dtype)


def check_streamable_tasks(tasks: dict) -> None:
    """Log-likelihood tasks and perplexity stream; generation cannot (every token needs every block)."""
    bad = [spec for spec, t in tasks.items() if t.family not in ("multiple_choice", "perplexity")]
    if bad:
        raise ConfigError(f"task(s) {bad} generate text token by token, which needs the whole model in memory; a "
                          "streamed model can be scored on multiple-choice and perplexity tasks only")


def check_streaming_args(args: argparse.Namespace, tasks: dict) -> None:
    if not args.out:
        raise ConfigError("streaming (--offload disk, or a model too big for memory) writes the compressed blocks to "
                          "--out as they are done: give --out")
    check_streamable_tasks(tasks)
    if args.merge_lowrank:
        raise ConfigError("--merge-lowrank is not available when streaming; save, then run prunekit export "
                          "--merge-lowrank where the model fits in memory")


def _evaluate(lazy, tok, args, seqlen: int, label: str, tokens: dict) -> dict:
    from ..eval import perplexity

    out = {}
    for ds in args.eval_datasets:
        out[ds] = perplexity(lazy.model, tok, ds, seqlen, args.max_windows, args.eval_batch_size, args.data_dir,
                             token_cache=tokens)
        print(f"{label} {ds}: ppl {out[ds].ppl:.3f} ({out[ds].windows} windows, streamed)")
    return out


def run_streamed(args: argparse.Namespace, config, tasks: dict, settings, prune_progress, print_summary) -> int:
    """The streamed pipeline; ``prune_progress`` wraps the prune in a progress bar."""
    from ..eval import check_seqlen
    from ..formats import atomic_folder, describe_streamed, finish_streamed
    from ..formats.atomic import check_free_space
    from ..streaming import model_bytes_on_disk, open_lazy, prune_streamed
    from ._tasks import run_with_progress

    check_streaming_args(args, tasks)
    eval_seqlen = args.eval_seqlen or config.calib.seqlen
    lazy, tok = open_lazy(args.model, args.dtype, args.device)
    print(f"streaming {args.model} one block at a time ({args.dtype}, {args.device}): its weights stay on disk")
    if args.eval_datasets:
        check_seqlen(lazy.model, eval_seqlen, "--eval-seqlen" if args.eval_seqlen else "--seqlen")
    needed = model_bytes_on_disk(args.model, args.dtype) or 0
    check_free_space(args.out, needed)  # before the dense baseline; the save checks again before it writes
    tokens: dict = {}
    dense = {} if args.no_dense_eval else _evaluate(lazy, tok, args, eval_seqlen, "dense", tokens)
    dense_tasks = {} if args.no_dense_eval else run_with_progress(lazy.model, tok, tasks, settings, "dense")
    result: dict = {}

    def write(tmp: Path) -> None:
        job = getattr(args, "compression", None) or config  # the handler prune built its components on, once
        report = prune_progress(lambda cb: prune_streamed(lazy, job, tmp, tok, callback=cb, data_dir=args.data_dir,
                                                          save_format=args.save_format))
        tok.save_pretrained(tmp)
        pruned_lazy, _ = open_lazy(str(tmp), args.dtype, args.device)
        pruned = _evaluate(pruned_lazy, tok, args, eval_seqlen, "pruned", tokens)
        pruned_tasks = run_with_progress(pruned_lazy.model, tok, tasks, settings, "pruned")
        report.evaluation = {"dense": {k: v.to_dict() for k, v in dense.items()},
                             "pruned": {k: v.to_dict() for k, v in pruned.items()}}
        if tasks:
            report.evaluation["tasks"] = {"dense": {k: r.to_dict() for k, r in dense_tasks.items()},
                                          "pruned": {k: r.to_dict() for k, r in pruned_tasks.items()}}
        report.extra.update(model=args.model, dtype=args.dtype, offload="disk")
        storage = finish_streamed(tmp, report.to_dict(), lazy.model, args.save_format)
        result.update(report=report, pruned=pruned, tasks=pruned_tasks, storage=storage)

    out = atomic_folder(args.out, write, args.overwrite, needed_bytes=needed)
    args.saved = out
    print_summary(result["report"], dense, result["pruned"], dense_tasks, result["tasks"])
    print(f"saved to {out} (written block by block while pruning: {describe_streamed(out, *result['storage'])})")
    if args.json:
        Path(args.json).expanduser().write_text(result["report"].to_json())
    return 0
