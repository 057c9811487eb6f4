"""``prunekit generate``: greedy text from a (sparse) model with the sparse CPU decode kernels."""

from __future__ import annotations

import argparse
import time

from .common import add_model_args, load_from_args, setup_threads, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the sparse CPU decode kernels (tokens/s vs dense)",
                       description="Greedy decoding with a KV cache: the prompt is prefilled densely, every new "
                                   "token goes through the sparse kernels (activation thresholds saved with the "
                                   "model, sparse weights as bitmasks). The dense model generates too, for its "
                                   "tokens/s (use prunekit bench for careful timing).")
    add_model_args(p)
    add_decode_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense model's run")
    p.set_defaults(func=run)


def add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="auto", choices=["auto", "dense", "bitmask"],
                   help="weight storage for the kernels: bitmask where a linear is >= 25%% zeros (auto, default), "
                        "dense W^T, or bitmask everywhere")


def check_decode_args(args: argparse.Namespace) -> None:
    from ..errors import ConfigError

    if args.device != "cpu":
        raise ConfigError(f"--device {args.device}: the sparse decode kernels run on the CPU; use --device cpu")
    if args.dtype in ("float16", "fp16"):
        raise ConfigError("--dtype float16: the sparse decode kernels run float32 or bfloat16; use one of those")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..kernels import greedy, prepare_decode, why_unavailable
    from ..activation import state_of

    setup_threads(args)
    check_decode_args(args)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    t0 = time.perf_counter()
    model, tok = load_from_args(args)
    print(f"loaded {args.model} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")
    ids = tok(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ConfigError("--prompt is empty after tokenization; give some text")
    state = state_of(model)
    handle = prepare_decode(model, args.weights)
    sparse = greedy(model, ids, args.max_new_tokens, tok.eos_token_id)
    sparsity = handle.sparsity()
    handle.restore()
    print(tok.decode(ids[0].tolist() + sparse.ids, skip_special_tokens=True))
    rows = [["sparse kernels", f"{sparse.prefill_s * 1e3:.0f}", f"{sparse.decode_tok_s:.2f}", str(len(sparse.ids))]]
    if not args.no_dense:
        if state is not None:
            state.remove()
        dense = greedy(model, ids, args.max_new_tokens, tok.eos_token_id)
        rows.insert(0, ["dense", f"{dense.prefill_s * 1e3:.0f}", f"{dense.decode_tok_s:.2f}", str(len(dense.ids))])
        rows.append(["decode speed-up", "", f"{sparse.decode_tok_s / dense.decode_tok_s:.2f}x", ""])
    print(table(rows, ["", "prefill ms", "decode tok/s", "tokens"]))
    if sparsity:
        print(f"activations skipped while decoding: {sum(sparsity.values()) / len(sparsity):.3f} (mean over "
              f"{len(sparsity)} modules)")
    why = why_unavailable()
    if why:
        print(f"note: C++ kernels off ({why}); the PyTorch fallback is not faster than dense")
    return 0
