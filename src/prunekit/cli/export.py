"""``prunekit export``: re-save a model in another format (compressed ⇄ dense, merged low rank, GGUF for llama.cpp)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..formats import SAVE_FORMATS
from ..formats.gguf import QUANTS as GGUF_QUANTS
from .common import add_model_args, load_from_args, setup_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-save a (compressed) model in another format",
                       description="Load a model (prunekit low-rank and compressed folders included) and save it "
                                   "again: --save-format dense writes a plain Hugging Face folder, compressed the "
                                   "sparse format (non-zeros + bitmask or N:M indices); --merge-lowrank multiplies "
                                   "low-rank factors back into dense weights so that plain transformers can load "
                                   "them.")
    p.add_argument("--to", default="hf", choices=["hf", "gguf"],
                   help="hf: a Hugging Face / prunekit folder (default); gguf: one file llama.cpp runs (--out FILE.gguf)")
    p.add_argument("--quant", default="f32", choices=list(GGUF_QUANTS),
                   help="--to gguf: weight type (q4_k_m is made by llama.cpp's llama-quantize; see docs/deploy.md)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="--to gguf: store an FFN whose width the quantization cannot hold in llama.cpp's fallback type "
                        "instead of refusing")
    p.add_argument("--verify", type=int, nargs="?", const=128, default=None, metavar="TOKENS",
                   help="--to gguf: run the written file in llama.cpp (python benchmarks/llamacpp.py build) on TOKENS "
                        "tokens (default 128) and compare its logits with the model's")
    p.add_argument("--tokenizer-pre", default=None,
                   help="--to gguf: llama.cpp pre-tokenizer name, when it cannot be read from the tokenizer")
    add_model_args(p)
    p.set_defaults(dtype=None)  # keep the stored dtype unless asked: a conversion must not change the weights
    next(a for a in p._actions if a.dest == "dtype").help = "weights dtype (default: the dtype the folder was saved in)"
    p.add_argument("--out", required=True, help="output folder, or file with --to gguf (written atomically)")
    p.add_argument("--save-format", default="dense", choices=list(SAVE_FORMATS),
                   help="dense: plain HF folder (default); compressed: prunekit's sparse format")
    p.add_argument("--merge-lowrank", action="store_true",
                   help="merge low-rank factors into dense nn.Linear weights (loads anywhere; no size saving)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..formats import reserve_output

    setup_threads(args)
    if args.to == "gguf":
        return _export_gguf(args)
    with reserve_output(args.out, args.overwrite):  # checked and held before the model loads
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    from ..formats import read_report, save_folder, stored_dtype
    from ..models.lowrank import lowrank_modules

    args.dtype = args.dtype or stored_dtype(args.model)
    t0 = time.perf_counter()
    model, tok = load_from_args(args)
    n_lr = len(lowrank_modules(model))
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {args.dtype}, "
          f"{n_lr} low-rank modules) in {time.perf_counter() - t0:.1f}s")
    report = read_report(args.model)  # read before the save: an in-place --overwrite replaces the source folder
    out, how = save_folder(model, tok, args.out, report, args.overwrite, args.merge_lowrank, args.save_format)
    print(f"saved to {out} ({how})")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    """Load (any prunekit format), check, and write one GGUF file; refusals come before the model loads."""
    from ..errors import ConfigError
    from ..formats.gguf import GGUFOptions, export_gguf, precheck

    if args.merge_lowrank or args.save_format != "dense":
        raise ConfigError("--merge-lowrank / --save-format are for --to hf; --to gguf merges low-rank factors itself")
    out = Path(args.out).expanduser()
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {args.out!r}: with --to gguf give a file name ending in .gguf")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {str(out)!r} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {str(out.parent)!r} does not exist; create it first")
    opts = GGUFOptions(quant=args.quant, allow_fallback=args.allow_fallback, tokenizer_pre=args.tokenizer_pre,
                       threads=args.threads or 2)
    precheck(args.model, opts)
    if args.verify is not None:
        from ..formats.llamacpp import binary

        binary("prunekit-logits")  # missing: one line now, not after the export
    args.dtype = args.dtype or "float32"
    t0 = time.perf_counter()
    model, tok = load_from_args(args)
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) in "
          f"{time.perf_counter() - t0:.1f}s")
    rep = export_gguf(model, tok, out, opts, overwrite=args.overwrite, name=Path(str(args.model)).name)
    widths = sorted({(x["heads"], x["kv_heads"], x["ffn"]) for x in rep.layers})
    shape = (f"{len(rep.layers)} layers of heads/kv/ffn {widths[0]}" if len(widths) == 1 else
             f"{len(rep.layers)} layers, per-layer heads/kv/ffn ({len(widths)} distinct)")
    print(f"wrote {rep.path}: llama.cpp architecture {rep.arch} (from {rep.source}), {shape}, {rep.quant}, "
          f"{rep.bytes / 2**20:.1f} MB, tensor types {rep.tensor_types}, in {rep.seconds:.1f}s")
    if rep.fallbacks:
        kinds: dict[str, int] = {}
        for line in rep.fallbacks:  # "blk.0.attn_q.weight: rows of 576 not a multiple of 256 (q4_K) -> q5_0"
            what = line.split(": ", 1)[1]
            kinds[what] = kinds.get(what, 0) + 1
        summary = "; ".join(f"{n} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        print(f"llama.cpp's per-tensor fallback on {len(rep.fallbacks)} tensors (rows its block size does not "
              f"divide): {summary}")
        if args.verbose:
            for line in rep.fallbacks:
                print(f"  {line}")
    if args.verify is not None:
        from ..formats.gguf import verify

        v = verify(model, tok, out, args.verify, threads=args.threads or 2)
        print(f"llama.cpp vs prunekit on {v['positions']} tokens: top-1 next token equal at {100 * v['top1']:.1f} % of "
              f"positions, max |logit difference| {v['max_abs']:.4f}")
    return 0
