"""``prunekit export``: re-save a model in another format (compressed ⇄ dense, merged low rank)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .common import add_model_args, load_from_args, setup_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-save a (compressed) model in another format",
                       description="Load a model (prunekit low-rank and compressed folders included) and save it "
                                   "again: --save-format dense writes a plain Hugging Face folder, compressed the "
                                   "sparse format (non-zeros + bitmask or N:M indices); --merge-lowrank multiplies "
                                   "low-rank factors back into dense weights so that plain transformers can load "
                                   "them.")
    add_model_args(p)
    p.set_defaults(dtype=None)  # keep the stored dtype unless asked: a conversion must not change the weights
    next(a for a in p._actions if a.dest == "dtype").help = "weights dtype (default: the dtype the folder was saved in)"
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--save-format", default="dense", choices=["dense", "compressed"],
                   help="dense: plain HF folder (default); compressed: prunekit's sparse format")
    p.add_argument("--merge-lowrank", action="store_true",
                   help="merge low-rank factors into dense nn.Linear weights (loads anywhere; no size saving)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run)


def stored_dtype(spec: str) -> str:
    """The dtype a folder's weights were saved in (manifest or ``config.json``), else ``float32``."""
    from ..models.compressed import MANIFEST

    folder = Path(spec).expanduser()
    for name, keys in ((MANIFEST, ("dtype",)), ("config.json", ("dtype", "torch_dtype"))):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            if data.get(key) in ("float32", "bfloat16", "float16"):
                return data[key]
    return "float32"


def prior_report(spec: str) -> dict | None:
    """The prunekit report of the folder being exported (what was pruned, how it measured), carried over."""
    from ..export import REPORT_FILE

    f = Path(spec).expanduser() / REPORT_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None


def run(args: argparse.Namespace) -> int:
    from ..export import reserve_output

    setup_threads(args)
    with reserve_output(args.out, args.overwrite):  # checked and held before the model loads
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from ..export import save_folder
    from ..models.lowrank import lowrank_modules

    args.dtype = args.dtype or stored_dtype(args.model)
    t0 = time.perf_counter()
    model, tok = load_from_args(args)
    n_lr = len(lowrank_modules(model))
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"{n_lr} low-rank modules) in {time.perf_counter() - t0:.1f}s")
    report = prior_report(args.model)  # read before the save: an in-place --overwrite replaces the source folder
    out, how = save_folder(model, tok, args.out, report, args.overwrite, args.merge_lowrank, args.save_format)
    print(f"saved to {out} ({how})")
    return 0
