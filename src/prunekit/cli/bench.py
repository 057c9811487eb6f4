"""``prunekit bench``: decode tokens/s with the sparse kernels next to the dense model's (interleaved)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_model_args, check_json_path, load_from_args, setup_threads, table
from .generate import add_decode_args, check_decode_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time prefill and decode with the sparse kernels vs dense (interleaved)",
                       description="Times the model dense (stock modules, no thresholds) and with the sparse "
                                   "decode kernels, interleaved (A B, B A, ...) after a warm-up: prefill of "
                                   "--prefill-tokens, and --new-tokens batch-1 decode steps after a "
                                   "--prompt-tokens prompt (random token ids, seeded). Median of --repeats with "
                                   "min-max spread.")
    add_model_args(p)
    add_decode_args(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length before decoding (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps timed (default 64)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prefill length timed; 0 to skip (default 512)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each variant (default 5)")
    p.add_argument("--json", default=None, help="also write the measurements to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..kernels import why_unavailable
    from ..kernels.bench import bench_decode
    from ..report import environment

    setup_threads(args)
    check_decode_args(args)
    check_json_path(args.json)
    for flag in ("prompt_tokens", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
    if args.prefill_tokens < 0:
        raise ConfigError(f"--prefill-tokens={args.prefill_tokens} must be >= 0")
    model, _ = load_from_args(args)
    res = bench_decode(model, args.prompt_tokens, args.new_tokens, args.prefill_tokens, args.repeats, args.weights)
    rows = []
    for name in ("dense", "sparse"):
        r = res[name]
        d = r["decode_s_per_token"]
        pre = r.get("prefill_s") or {}
        rows.append([name, _ms(pre), f"{d['median'] * 1e3:.2f} [{d['min'] * 1e3:.2f}-{d['max'] * 1e3:.2f}]",
                     f"{r['decode_tok_s']:.2f}"])
    print(table(rows, ["", "prefill ms [min-max]", "decode ms/token [min-max]", "decode tok/s"]))
    print(f"decode speed-up {res.get('decode_speedup', 0):.2f}x, prefill {res.get('prefill_speedup', 1):.2f}x "
          f"({args.repeats} interleaved repeats, {res['threads']} threads, {args.dtype})")
    if res.get("decode_sparsity_mean") is not None:
        print(f"activations skipped while decoding: {res['decode_sparsity_mean']:.3f} (mean over modules)")
    why = why_unavailable()
    if why:
        print(f"note: C++ kernels off ({why}); the PyTorch fallback is not faster than dense")
    if args.json:
        res["environment"] = environment()
        Path(args.json).expanduser().write_text(json.dumps(res, indent=2, default=str))
    return 0


def _ms(s: dict) -> str:
    if not s:
        return "-"
    return f"{s['median'] * 1e3:.0f} [{s['min'] * 1e3:.0f}-{s['max'] * 1e3:.0f}]"
