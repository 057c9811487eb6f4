"""Does the engine compute on the activations the model really has? Measured on real models.

For each model (default: Gemma-3-270M, which mixes sliding-window and full attention with a rotary
table per layer type, and SmolLM2-135M, a plain Llama):

1. **Replay**: the engine's block-by-block replay of the dense model against the model's own
   forward, per block (relative L2 error of the block outputs), for prunekit's per-block inputs
   and for the reference implementations' replay of block 0's arguments to every block.
2. **One-shot pruning** (Wanda and SparseGPT, 50 %): prunekit's engine against a slow, obviously
   correct computation that runs the model's *own* forward once per block (up to that block,
   forward hooks gather the statistics), and against block-0 replay: share of mask positions that
   agree, relative weight difference, WikiText-2 perplexity (seqlen 1024, first 20 windows).

Usage (writes benchmarks/results/engine_replay.{md,json}):
    PRUNEKIT_DATA=../shared/data flock /tmp/prunekit-heavy.lock python benchmarks/engine_replay.py
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from common import write_results

HERE = Path(__file__).resolve().parent
COMMAND = "PRUNEKIT_DATA=../shared/data python benchmarks/engine_replay.py"


class _Stop(Exception):
    pass


@contextlib.contextmanager
def block0_replay():
    """The reference implementations' ``Catcher``: block 0's arguments replayed to every block."""
    from prunekit.calibration.context import BlockInputs

    orig = BlockInputs.call

    def call(self, index, block, b, hidden=None):
        return orig(self, 0, block, b, hidden)

    BlockInputs.call = call
    try:
        yield
    finally:
        BlockInputs.call = orig


def own_forward_outputs(model, ids, bs):
    """Every block's output from the model's own forward (hooks)."""
    from prunekit.models import find_blocks

    _, blocks = find_blocks(model)
    outs = [[] for _ in blocks]
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        for s in range(0, ids.shape[0], bs):
            model(input_ids=ids[s: s + bs], use_cache=False)
    for h in hooks:
        h.remove()
    return [torch.cat(o) for o in outs]


def replay_errors(model, ids, bs):
    """Relative error per block: prunekit replay and block-0 replay vs the model's own forward."""
    from prunekit.calibration import run_sequential
    from prunekit.methods import CompressResult, Method, Target
    from prunekit.models import decoder_linears

    class Keep(Method):
        name, needs_calibration = "keep", False

        def compress(self, name, linear, stats, target):
            return CompressResult()

    want = own_forward_outputs(model, ids, bs)
    targets = {n: Target(0.0) for n in decoder_linears(model)}
    out = {}
    for label, ctx in (("prunekit", contextlib.nullcontext()), ("block-0 replay", block0_replay())):
        got = []
        with ctx:
            run_sequential(model, ids, Keep(), targets, bs, keep_outputs=True,
                           callback=lambda ev: got.append(torch.cat(ev.outputs).clone()))
        out[label] = [float((g - w).norm() / w.norm()) for g, w in zip(got, want)]
    return out


def own_forward_prune(model, ids, bs, method, sparsity):
    """Per block: the model's own forward up to that block gathers the statistics (hooks), then the
    method compresses the block's linears — slow and obviously correct."""
    from prunekit.calibration import calibration_forward_context
    from prunekit.methods import Target
    from prunekit.models import block_linears, find_blocks

    path, blocks = find_blocks(model)
    with calibration_forward_context(model):
        for i, block in enumerate(blocks):
            linears = block_linears(block, f"{path}.{i}")
            stats = {n: method.init_stats(m) for n, m in linears.items()}
            hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: method.update_stats(stats[n], a[0]))
                     for n, m in linears.items()]
            hooks.append(block.register_forward_hook(lambda *a: (_ for _ in ()).throw(_Stop())))
            for s in range(0, ids.shape[0], bs):
                try:
                    model(input_ids=ids[s: s + bs], use_cache=False)
                except _Stop:
                    pass
            for h in hooks:
                h.remove()
            for n, m in linears.items():
                method.compress(n, m, stats[n], Target(sparsity))


def compare(a, b):
    from prunekit.models import decoder_linears, weight_view

    la, lb = decoder_linears(a), decoder_linears(b)
    same = total = 0
    num = den = 0.0
    for n in la:
        wa, wb = weight_view(la[n]).float(), weight_view(lb[n]).float()
        same += int(((wa != 0) == (wb != 0)).sum())
        total += wa.numel()
        num += float((wa - wb).square().sum())
        den += float(wb.square().sum())
    return same / total, (num / den) ** 0.5


def ppl(model, tok, args):
    import prunekit

    return prunekit.evaluate(model, tok, prunekit.EvalConfig(seqlen=args.eval_seqlen, max_windows=args.windows))[
        "wikitext2"].ppl


def run_model(alias, args):
    import prunekit
    from prunekit.data import calibration_ids
    from prunekit.methods import build_method

    t0 = time.perf_counter()
    dense, tok = prunekit.load_model(alias)
    ids = calibration_ids(prunekit.CalibConfig("austen", args.nsamples, args.seqlen, 0), tok)
    row = {"model": alias, "class": type(dense).__name__, "blocks": dense.config.num_hidden_layers,
           "layer_types": sorted(set(getattr(dense.config, "layer_types", None) or ["full_attention"])),
           "calibration": f"austen {args.nsamples}x{args.seqlen}, seed 0, batch {args.batch_size}"}
    row["replay_rel_error"] = replay_errors(dense, ids, args.batch_size)
    row["dense_ppl"] = ppl(dense, tok, args)
    row["methods"] = {}
    for name in args.methods:
        res = {}
        ref = copy.deepcopy(dense)
        own_forward_prune(ref, ids, args.batch_size, build_method(name), 0.5)
        res["own_forward_ppl"] = ppl(ref, tok, args)
        for label, ctx in (("prunekit", contextlib.nullcontext()), ("block-0 replay", block0_replay())):
            m = copy.deepcopy(dense)
            with ctx:
                prunekit.prune(m, prunekit.PruneConfig(method=name, sparsity=0.5,
                                                       calib={"batch_size": args.batch_size}), calib=ids)
            agree, rel = compare(m, ref)
            res[label] = {"mask_agreement": agree, "weight_rel_diff": rel, "ppl": ppl(m, tok, args)}
            del m
        row["methods"][name] = res
        print(json.dumps({alias: {name: res}}), flush=True)
    row["seconds"] = time.perf_counter() - t0
    return row


def render(data) -> str:
    env = data["environment"]
    lines = ["# Per-block inputs: the engine against the model's own forward", "",
             f"Machine: {env['processor']}, {env['threads']} threads; torch {env['torch']}, transformers "
             f"{env['transformers']}. Command: `{data['command']}`.", "",
             "Replay: relative L2 error of each block's output, engine replay of the dense model vs the model's own "
             "forward. Pruning: 50 % unstructured; the reference runs the model's own forward (up to each block) "
             "to gather that block's statistics; masks compared position by position over every decoder linear; "
             f"WikiText-2 perplexity, seqlen {data['eval_seqlen']}, first {data['windows']} windows.", ""]
    for row in data["rows"]:
        rp = row["replay_rel_error"]
        lines += [f"## {row['model']} ({row['class']}, {row['blocks']} blocks, layer types {', '.join(row['layer_types'])})",
                  "", f"Calibration {row['calibration']}; dense perplexity {row['dense_ppl']:.3f}.", "",
                  "| replay | max rel. error | blocks off by > 1e-4 | first such block |", "|---|---|---|---|"]
        for label, errs in rp.items():
            off = [i for i, e in enumerate(errs) if e > 1e-4]
            lines.append(f"| {label} | {max(errs):.2e} | {len(off)} of {len(errs)} | {off[0] if off else '-'} |")
        lines += ["", "| method | engine | mask agreement with own-forward | weight rel. diff | ppl (own-forward ppl) |",
                  "|---|---|---|---|---|"]
        for name, res in row["methods"].items():
            for label in ("prunekit", "block-0 replay"):
                r = res[label]
                lines.append(f"| {name} 50% | {label} | {100 * r['mask_agreement']:.3f} % | {r['weight_rel_diff']:.2e} | "
                             f"{r['ppl']:.3f} ({res['own_forward_ppl']:.3f}) |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "engine_replay"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from prunekit.report import environment

    data = {"command": COMMAND + " " + " ".join(sys.argv[1:]), "environment": environment(),
            "python": platform.python_version(), "eval_seqlen": args.eval_seqlen, "windows": args.windows, "rows": []}
    for alias in args.models:
        data["rows"].append(run_model(alias, args))
        write_results(args.out, data, render)
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
