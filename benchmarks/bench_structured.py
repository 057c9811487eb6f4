"""Structured compression of SmolLM2-135M: parameters, folder size, quality and real CPU speed.

For every pattern x criterion x allocation x sparsity of the grid (and low rank and unstructured
Wanda at the same parameter count), one row: total parameters, saved folder size and format,
WikiText-2 perplexity (core.md protocol: seqlen 1024, first 20 windows), PIQA and BoolQ accuracy
with standard errors (first ``--limit`` examples), and prefill (one 512-token sequence) and decode
(batch 1, KV cache, 64 new tokens after a 128-token prompt) latency in float32 and bfloat16 —
median of 5 after a warm-up, in inference mode — beside the bound dense params / remaining params.
The dense model's latency is measured at the start (and end) of every invocation, in the same
process, and every speed-up is relative to it. Rows whose models have identical tensor shapes
share one latency measurement (said in the row). Rows are written after each one; an
interrupted run resumes where it stopped.

Heavy; run under the shared lock, e.g. one chunk::

    flock /tmp/prunekit-heavy.lock python benchmarks/bench_structured.py --patterns channels --sparsities 0.2

Writes ``benchmarks/results/structured.json`` and ``structured.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
os.environ.setdefault("PRUNEKIT_DATA", str(HERE.parents[1] / "shared" / "data"))
sys.path.insert(0, str(HERE))

import prunekit  # noqa: E402
from prunekit import CalibConfig, PruneConfig  # noqa: E402
from prunekit.data import calibration_ids  # noqa: E402
from prunekit.eval import perplexity  # noqa: E402
from prunekit.eval.tasks import TaskSettings, prepare_tasks, run_tasks  # noqa: E402
from prunekit.formats import save_compressed  # noqa: E402
from prunekit.models import decoder_linears, weight_view  # noqa: E402
from prunekit.report import environment  # noqa: E402
from prunekit.structured.summary import param_count  # noqa: E402
from common import folder_mb, load_json, seconds, write_results  # noqa: E402
from structured_render import render  # noqa: E402

UNIT = ("magnitude", "wanda", "flap", "slimgpt")
BLOCK = ("shortgpt", "ppl")


def grid(args) -> list[dict]:
    """The rows this invocation should run (labels are unique; finished ones are skipped)."""
    rows = [{"label": "dense", "family": "dense"}]
    for s in args.sparsities:
        for pat in (args.patterns if "structured" in args.families else []):
            if pat in ("blocks", "ffn"):
                rows += [_row("structured", pat, c, "uniform", s) for c in BLOCK if c in args.criteria]
                continue
            if pat == "heads" and s > 0.125:  # attention holds 25% of the weights; 2 of 3 query heads at most
                continue
            for c in UNIT:
                if c in args.criteria:
                    rows += [_row("structured", pat, c, a, s) for a in args.allocations]
        if "lowrank" in args.families:
            rows += [_row("lowrank", None, m, "uniform", s, o) for m, o in LOWRANK_OPTIONS.items()]
        if "unstructured" in args.families:
            rows.append(_row("unstructured", None, "wanda", "uniform", s))
    return rows


LOWRANK_OPTIONS = {"svd-llm": {"budget": "params"}, "welore": {"objective": "params"}}


def parse_row(label: str) -> dict:
    """``"channels/flap/global/0.2"``, ``"lowrank/svd-llm/uniform/0.25"``, ``"unstructured/wanda/uniform/0.1"``;
    method options after ``+``: ``"ffn/shortgpt+bias=true/uniform/0.2"``."""
    first, method, allocation, s = label.split("/")
    method, *pairs = method.split("+")
    options = dict(p.split("=", 1) for p in pairs)
    if first in ("lowrank", "unstructured"):
        row = _row(first, None, method, allocation, float(s), {**LOWRANK_OPTIONS.get(method, {}), **options})
    else:
        row = _row("structured", first, method, allocation, float(s), options)
    row["label"] = label
    return row


def _row(family, pattern, method, allocation, sparsity, options=None) -> dict:
    label = f"{pattern or family}/{method}/{allocation}/{sparsity:g}"
    return {"label": label, "family": family, "pattern": pattern or "unstructured", "method": method,
            "allocation": allocation, "sparsity": sparsity, "options": options or {}}


def _prefill_run(model, ids) -> float:
    return seconds(lambda: model(ids, use_cache=False))


def _decode_run(model, ids, prompt: int, new: int) -> float:
    """Seconds per token of ``new`` greedy steps with a KV cache after a ``prompt``-token prefill."""
    out = model(ids[:, :prompt], use_cache=True)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new):
        out = model(nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / new


@torch.inference_mode()
def latency(models: dict, vocab: int, prefill: int = 512, prompt: int = 128, new: int = 64,
            repeats: int = 5) -> dict:
    """Median prefill time of one ``prefill``-token sequence and per-token decode time (KV cache, batch 1)
    of each model in ``models`` (name -> model).

    Every model runs one untimed prefill and decode first (allocator and kernel warm-up). With several
    models the timed repetitions interleave (A B, B A, A B, ...), so a drift of the machine's speed
    during the measurement reaches every model alike and cancels in their ratio."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prefill), generator=g)
    names = list(models)
    for m in models.values():
        _prefill_run(m, ids)
        _decode_run(m, ids, prompt, new)
    pre = {n: [] for n in names}
    dec = {n: [] for n in names}
    for i in range(repeats):
        for n in (names if i % 2 == 0 else names[::-1]):
            pre[n].append(_prefill_run(models[n], ids))
    for i in range(repeats):
        for n in (names if i % 2 == 0 else names[::-1]):
            dec[n].append(_decode_run(models[n], ids, prompt, new))
    return {n: {"prefill_ms": 1000 * statistics.median(pre[n]), "decode_ms": 1000 * statistics.median(dec[n]),
                "prefill_all_ms": [1000 * x for x in pre[n]], "decode_all_ms": [1000 * x for x in dec[n]]}
            for n in names}


def speeds(model, repeats: int = 5, dense: dict | None = None) -> dict:
    """fp32 then bf16 latency of ``model`` (converted to bf16 in place). With ``dense`` (dtype name ->
    dense model) the dense model is timed interleaved with it: ``{"row": ..., "dense": ...}`` per dtype."""
    vocab = model.config.vocab_size
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model.to(dtype)
        res = latency({"row": model, **({"dense": dense[name]} if dense else {})}, vocab, repeats=repeats)
        out[name] = res if dense else res["row"]
    return out


def linear_weights(model) -> int:
    """Weights of the decoder blocks' linears (biases excluded, as in sparsity)."""
    return sum(weight_view(m).numel() for m in decoder_linears(model).values())


def shape_key(model) -> str:
    return json.dumps(sorted((k, list(v.shape)) for k, v in model.state_dict().items()))


def run_row(spec: dict, ctx: dict, args) -> dict:
    model, tok = prunekit.load_model("smollm2-135m")
    row = dict(spec)
    dense_params = param_count(model)
    dense_linear = linear_weights(model)
    t0 = time.perf_counter()
    if spec["family"] != "dense":
        cfg = PruneConfig(method=spec["method"], pattern=spec["pattern"], sparsity=spec["sparsity"],
                          allocation=spec["allocation"], method_options=spec["options"],
                          calib=CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen))
        rep = prunekit.prune(model, cfg, calib=ctx["calib"])
        row["prune_s"] = time.perf_counter() - t0
        # structured: weights gone from the decoder linears; low rank: parameters saved; unstructured: zeros
        row["removed_of_linear"] = (1 - linear_weights(model) / dense_linear) if spec["family"] == "structured" \
            else rep.sparsity
        row["structure"] = rep.extra.get("structure")
        if "method_summary" in rep.extra:
            row["method_summary"] = {k: v for k, v in rep.extra["method_summary"].items() if k != "layers"}
    row["params"] = param_count(model)
    row["params_dense"] = dense_params
    row["bound"] = dense_params / row["params"]
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        out, how = save_compressed(model, tok, Path(tmp) / "m")
        row["folder_mb"], row["format"] = folder_mb(out), how.split(":")[0]
    if spec.get("save_to"):
        out, how = save_compressed(model, tok, spec["save_to"], overwrite=True)
        row["saved_to"] = str(out)
    t1 = time.perf_counter()
    res = perplexity(model, tok, "wikitext2", args.eval_seqlen, args.windows)
    row.update(ppl=res.ppl, ppl_tokens=res.tokens, ppl_s=time.perf_counter() - t1)
    if args.limit:
        t1 = time.perf_counter()
        results = run_tasks(model, tok, ctx["tasks"], TaskSettings(limit=args.limit, batch_size=16))
        row["tasks"] = {k: {"acc": r.metrics.get("acc"), "stderr": r.stderr.get("acc"), "n": r.n}
                        for k, r in results.items()}
        row["tasks_s"] = time.perf_counter() - t1
    key = shape_key(model)
    if spec["family"] == "dense":  # measured at the start of this run
        row["speed"] = ctx["dense_speed"]
        ctx["speed_by_shape"][key] = (row["speed"], row["label"], None)
    elif key in ctx["speed_by_shape"]:
        row["speed"], row["speed_shared_with"], paired = ctx["speed_by_shape"][key]
        if paired:
            row["dense_speed_paired"] = paired
    else:
        t1 = time.perf_counter()
        paired = speeds(model, ctx["repeats"], ctx["dense_models"])
        row["speed"] = {d: v["row"] for d, v in paired.items()}
        row["dense_speed_paired"] = {d: v["dense"] for d, v in paired.items()}
        row["speed_s"] = time.perf_counter() - t1
        ctx["speed_by_shape"][key] = (row["speed"], row["label"], row["dense_speed_paired"])
    row["dense_speed"] = ctx["dense_speed"]
    row["wall_s"] = time.perf_counter() - t0
    del model
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patterns", nargs="*", default=["channels", "width", "heads", "blocks", "ffn"])
    ap.add_argument("--criteria", nargs="*", default=list(UNIT + BLOCK))
    ap.add_argument("--allocations", nargs="*", default=["uniform", "global"])
    ap.add_argument("--sparsities", nargs="*", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--families", nargs="*", default=["structured", "lowrank", "unstructured"])
    ap.add_argument("--only", nargs="*", default=None, help="run only these labels")
    ap.add_argument("--redo", nargs="*", default=[], help="measure these labels again (replacing their rows)")
    ap.add_argument("--rows", nargs="*", default=[], help="extra rows by label, e.g. channels/flap/owl/0.2, "
                                                          "lowrank/svd-llm/uniform/0.25")
    ap.add_argument("--save", nargs="*", default=[], help="LABEL=DIR: also save that row's model to DIR")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--limit", type=int, default=100, help="PIQA/BoolQ examples (0: no tasks)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is reported)")
    ap.add_argument("--tmp", default=None, help="where folders are saved to be measured")
    ap.add_argument("--out", default=str(RESULTS / "structured"))
    args = ap.parse_args()

    data = load_json(args.out + ".json", {"rows": [], "runs": []})
    done = {r["label"] for r in data["rows"]} - set(args.redo)
    specs = [s for s in grid(args) if s["family"] != "dense"] + [parse_row(x) for x in args.rows + args.redo]
    specs = list({s["label"]: s for s in specs}.values())
    saves = dict(x.split("=", 1) for x in args.save)
    for s in specs:
        if s["label"] in saves:
            s["save_to"] = saves[s["label"]]
    specs = [s for s in specs if s["label"] not in done and (args.only is None or s["label"] in args.only)]
    if "dense" not in done:
        specs.insert(0, {"label": "dense", "family": "dense"})
    model, tok = prunekit.load_model("smollm2-135m")
    run = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python " + " ".join(map(shlex.quote, sys.argv)),
           "environment": environment(), "loadavg_start": os.getloadavg()[0]}
    run["dense_speed"] = speeds(model, args.repeats)
    dense_bf16 = model  # speeds() left it in bf16; the fp32 copy is loaded again
    dense_fp32, _ = prunekit.load_model("smollm2-135m")
    del model
    ctx = {"calib": calibration_ids(CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen), tok),
           "tasks": prepare_tasks(["piqa", "boolq"]) if args.limit else {}, "speed_by_shape": {}, "repeats": args.repeats,
           "dense_speed": run["dense_speed"], "dense_models": {"float32": dense_fp32, "bfloat16": dense_bf16}}
    data["runs"].append(run)
    data["settings"] = {"calibration": f"austen, {args.nsamples} x {args.seqlen} tokens, seed 0 (shared by all rows)",
                        "ppl": f"WikiText-2 test, seqlen {args.eval_seqlen}, first {args.windows} windows",
                        "tasks": f"piqa, boolq 0-shot acc, first {args.limit} examples each, batch 16",
                        "latency": "batch 1; prefill one 512-token sequence; decode 64 new tokens after a 128-token "
                                   "prompt with KV cache (ms per token); median of 5 after one untimed warm-up; "
                                   "inference mode; fp32, then the same model in bf16"}
    for spec in specs:
        print(f"== {spec['label']}", flush=True)
        row = run_row(spec, ctx, args)
        row["run"] = len(data["runs"]) - 1
        data["rows"] = [r for r in data["rows"] if r["label"] != row["label"]] + [row]
        _write(data, args)
        print(json.dumps({k: row.get(k) for k in ("label", "params", "ppl", "tasks", "wall_s")}, default=str),
              flush=True)
    model, _ = prunekit.load_model("smollm2-135m")
    run["dense_speed_end"] = speeds(model, args.repeats)  # drift check: the same dense model at the end of the run
    run["loadavg_end"] = os.getloadavg()[0]
    _write(data, args)


def _write(data: dict, args) -> None:
    write_results(args.out, data, render)


if __name__ == "__main__":
    main()
