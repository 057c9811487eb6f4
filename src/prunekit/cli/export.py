"""``prunekit export``: re-save a model, e.g. merge low-rank factors for plain transformers."""

from __future__ import annotations

import argparse
import time

from .common import add_model_args, load_from_args, setup_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-save a (compressed) model in another format",
                       description="Load a model (a prunekit low-rank folder is rebuilt with its factorized "
                                   "modules) and save it again: --merge-lowrank multiplies the factors back "
                                   "into dense weights so that plain transformers can load the result.")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--merge-lowrank", action="store_true",
                   help="merge low-rank factors into dense nn.Linear weights (loads anywhere; no size saving)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import reserve_output

    setup_threads(args)
    with reserve_output(args.out, args.overwrite):  # checked and held before the model loads
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from ..export.lowrank import save_compressed
    from ..models.lowrank import lowrank_modules

    t0 = time.perf_counter()
    model, tok = load_from_args(args)
    n_lr = len(lowrank_modules(model))
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{n_lr} low-rank modules) in {time.perf_counter() - t0:.1f}s")
    out, how = save_compressed(model, tok, args.out, None, args.overwrite, args.merge_lowrank)
    print(f"saved to {out} ({how})")
    return 0
