"""Deploy: SmolLM2-135M and its structured 25 % models in llama.cpp — size, perplexity, speed, correctness.

For every row (the dense model, each structured 25 % row of benchmarks/results/structured.md, a
per-layer-width row, and any recovered folder under ``/work/artifacts/recovered/``):

1. **model** — the pruned folder, made with the prunekit CLI (``prunekit prune …``, the recipes of
   bench_structured.py: austen calibration, 32 x 1024 tokens, seed 0) unless it exists;
2. **quality** — prunekit's WikiText-2 perplexity (test, seqlen 1024, first 20 windows: the
   structured.md protocol) and its logits on a fixed 512-token prompt (the first 512 tokens of the
   WikiText-2 test text);
3. **export** — ``prunekit export DIR --to gguf --quant Q`` for f32, bf16, q8_0 and q4_k_m;
4. **check** — llama.cpp's logits on the same 512 tokens (top-1 agreement, max abs error),
   ``llama-perplexity`` over the same 20 windows (f32, q8_0, q4_k_m; see llamacpp_tools.PPL_SEQLEN for
   the one protocol difference), and a greedy continuation of a fixed prompt (q8_0, q4_k_m);
5. **speed** — ``llama-bench -p 512 -n 128 -t 2 -r 5`` with the dense model, the row's model and the
   dense model again in one invocation, per quantization (median and range of the 5 repetitions;
   the second dense run measures drift);
6. **agree** — prunekit's float32 perplexity on llama-perplexity's own windows (1024 tokens every 1023,
   PyTorch), so the two perplexities differ only in the engine; and the greedy continuation of the same
   prompt in PyTorch (float32) and in llama.cpp (f32 file, f32 KV cache), compared word by word.

Rows are written after every stage; an interrupted run resumes where it stopped. ``--max-minutes``
stops at a stage boundary (keep each locked run short on a shared machine)::

    /work/bin/heavy --tag deploy python benchmarks/bench_deploy.py --rows blocks/shortgpt/uniform/0.25 --max-minutes 35
    /work/bin/heavy --tag deploy python benchmarks/bench_deploy.py --recovered   # every folder in /work/artifacts/recovered

Writes ``benchmarks/results/deploy.json`` and ``deploy.md``; models and GGUF files go to ``--work``
(default ``/work/artifacts/deploy``), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
os.environ.setdefault("PRUNEKIT_DATA", str(HERE.parents[1] / "shared" / "data"))
sys.path.insert(0, str(HERE))

import prunekit  # noqa: E402
import llamacpp_tools as lt  # noqa: E402
from common import cpu_flags, load_json, write_results  # noqa: E402
from deploy_render import render  # noqa: E402
from prunekit.eval.perplexity import eval_token_ids, perplexity, shifted_nll  # noqa: E402
from prunekit.formats import llamacpp, read_report  # noqa: E402
from prunekit.report import environment  # noqa: E402
from prunekit.structured.summary import param_count  # noqa: E402

QUANTS = ("f32", "bf16", "q8_0", "q4_k_m")
#: llama-perplexity runs at these (bf16's logits are within rounding of f32's: top-1 and max error are reported)
PPL_QUANTS = ("f32", "q8_0", "q4_k_m")
PPL_WINDOWS = 20
PROMPT_TOKENS = 512
GEN_PROMPT = "The history of the city begins in"
GEN_TOKENS = 48
#: label -> extra `prunekit prune` flags (the recipes of bench_structured.py's rows); "+m32" = --width-multiple 32
ROWS = {
    "blocks/shortgpt/uniform/0.25": "--pattern blocks --method shortgpt --sparsity 0.25",
    "channels/slimgpt/uniform/0.25": "--pattern channels --method slimgpt --sparsity 0.25",
    "channels/flap/global/0.25": "--pattern channels --method flap --sparsity 0.25 --allocation global",
    "channels/slimgpt/global/0.25": "--pattern channels --method slimgpt --sparsity 0.25 --allocation global",
    "width/slimgpt/uniform/0.25": "--pattern width --method slimgpt --sparsity 0.25",
    "width/flap/uniform/0.25": "--pattern width --method flap --sparsity 0.25",
    "width/flap/global/0.25": "--pattern width --method flap --sparsity 0.25 --allocation global",
    "ffn/shortgpt/uniform/0.25": "--pattern ffn --method shortgpt --sparsity 0.25",
    "heads/slimgpt/uniform/0.1": "--pattern heads --method slimgpt --sparsity 0.1",
    "heads/slimgpt/global/0.1": "--pattern heads --method slimgpt --sparsity 0.1 --allocation global",
}
CALIB = "--calib austen --nsamples 32 --seqlen 1024 --seed 0"


def row_spec(label: str, work: Path) -> dict:
    """Where a row's model comes from: the dense alias, a recovered folder, or a prune recipe."""
    if label == "dense":
        return {"label": label, "model": "smollm2-135m", "kind": "dense"}
    if label.startswith("recovered/"):
        return {"label": label, "model": str(Path(os.environ.get("PRUNEKIT_RECOVERED", "/work/artifacts/recovered"))
                                              / label.split("/", 1)[1]), "kind": "recovered"}
    base, _, variant = label.partition("+")
    if base not in ROWS:
        raise SystemExit(f"unknown row {label!r}; known: dense, recovered/NAME, {', '.join(ROWS)} (+m32)")
    flags = ROWS[base] + (" --width-multiple 32" if variant == "m32" else "")
    return {"label": label, "model": str(work / "models" / label.replace("/", "_")), "kind": "structured",
            "prune_flags": flags}


def cli(args: list[str], timeout: float = 7200) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "prunekit.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    if proc.returncode != 0:
        raise RuntimeError(f"prunekit {' '.join(args)} failed: {proc.stderr[-1500:]}")
    return "prunekit " + " ".join(map(shlex.quote, args)), time.perf_counter() - t0


def stage_model(row: dict, spec: dict) -> None:
    if spec["kind"] != "structured" or Path(spec["model"]).is_dir():
        row.setdefault("model", spec["model"])
        return
    args = ["prune", "smollm2-135m", *shlex.split(spec["prune_flags"]), *shlex.split(CALIB), "--eval",
            "--no-dense-eval", "--out", spec["model"]]
    row["prune_command"], row["prune_s"] = cli(args)
    row["model"] = spec["model"]


def stage_quality(row: dict, ctx: dict) -> None:
    model, tok = prunekit.load_model(row["model"])
    row["params"] = param_count(model)
    res = perplexity(model, tok, "wikitext2", 1024, PPL_WINDOWS)
    row["prunekit_ppl"] = {"ppl": res.ppl, "seqlen": res.seqlen, "windows": res.windows, "tokens": res.tokens}
    ids = ctx["prompt_ids"]
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float().numpy()
    np.save(ctx["work"] / "logits" / f"{_slug(row['label'])}.npy", logits)
    st = (read_report(row["model"]) or {}).get("extra", {}).get("structure")
    if st:
        row["structure"] = {k: st.get(k) for k in ("uniform_widths", "plan") if k in st}
    del model


def stage_export(row: dict, ctx: dict) -> None:
    import gguf

    row.setdefault("gguf", {})
    for q in QUANTS:
        if q in row["gguf"]:
            continue
        out = ctx["work"] / "gguf" / f"{_slug(row['label'])}.{q}.gguf"
        cmd, secs = cli(["export", row["model"], "--to", "gguf", "--quant", q, "--out", str(out), "--overwrite"])
        r = gguf.GGUFReader(str(out))
        types: dict[str, int] = {}
        for t in r.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        row["gguf"][q] = {"path": str(out), "bytes": out.stat().st_size, "command": cmd, "seconds": secs,
                          "arch": r.fields["general.architecture"].contents(), "tensor_types": types,
                          "tensor_bytes": int(sum(int(t.n_bytes) for t in r.tensors)), "read_bytes": _read_bytes(r),
                          "layers": _layers(r), "decoder_weights": int(sum(int(t.n_elements) for t in r.tensors
                                                                            if t.name.startswith("blk.") and len(t.shape) == 2))}


def _layers(reader) -> list[dict]:
    """Per-layer head count, KV head count, FFN length and head size, from the GGUF's own metadata."""
    arch = reader.fields["general.architecture"].contents()
    n = reader.fields[f"{arch}.block_count"].contents()
    get = lambda k: reader.fields[f"{arch}.{k}"].contents()  # noqa: E731
    per = lambda v: list(v) if isinstance(v, list) else [v] * n  # noqa: E731
    hd = get("attention.key_length") if f"{arch}.attention.key_length" in reader.fields else \
        get("embedding_length") // per(get("attention.head_count"))[0]
    return [{"heads": h, "kv_heads": kv, "ffn": f, "head_dim": hd} for h, kv, f in
            zip(per(get("attention.head_count")), per(get("attention.head_count_kv")), per(get("feed_forward_length")))]


def _read_bytes(reader) -> int:
    """Weight bytes llama.cpp reads per decoded token: every tensor, except the embedding table when a separate
    output matrix exists (then only one embedding row is read)."""
    names = {t.name for t in reader.tensors}
    skip = "token_embd.weight" if "output.weight" in names else None
    return int(sum(int(t.n_bytes) for t in reader.tensors if t.name != skip))


def stage_check(row: dict, ctx: dict) -> None:
    ref = np.load(ctx["work"] / "logits" / f"{_slug(row['label'])}.npy")
    row.setdefault("llamacpp", {})
    for q in QUANTS:
        cell = row["llamacpp"].setdefault(q, {})
        path = Path(row["gguf"][q]["path"])
        if "top1" not in cell:
            got = llamacpp.logits(path, ctx["prompt_ids"].numpy())
            cell.update(top1=float((got.argmax(-1) == ref.argmax(-1)).mean()), max_abs=float(np.abs(got - ref).max()),
                        positions=int(ref.shape[0]))
        if "ppl" not in cell and q in PPL_QUANTS:
            cell["ppl"] = lt.perplexity(path, ctx["text_file"], PPL_WINDOWS)
    for q in ("q8_0", "q4_k_m"):
        if "generation" not in row["llamacpp"][q]:
            row["llamacpp"][q]["generation"] = lt.generate(Path(row["gguf"][q]["path"]), GEN_PROMPT)


def stage_speed(row: dict, dense: dict, quants=QUANTS) -> bool:
    """llama-bench per quantization; True when every one of QUANTS is measured (the stage is done)."""
    row.setdefault("speed", {})
    for q in quants:
        if q in row["speed"]:
            continue
        d, m = Path(dense["gguf"][q]["path"]), Path(row["gguf"][q]["path"])
        res = lt.bench([d, m, d] if row["label"] != "dense" else [d])
        per = res["results"]
        row["speed"][q] = {"command": res["command"], "row": per[str(m)], "dense": per[str(d)],
                           "loadavg": os.getloadavg()[0]}
    return all(q in row["speed"] for q in QUANTS)


def ppl_llamacpp_windows(model, tok, windows: int = PPL_WINDOWS, seqlen: int = lt.PPL_SEQLEN) -> dict:
    """prunekit's float32 perplexity on llama-perplexity's windows: ``seqlen`` tokens starting every
    ``seqlen - 1`` (``--ppl-stride``), targets 1..seqlen-1 of each — its protocol, in PyTorch."""
    ids = eval_token_ids(tok, "wikitext2", seqlen)
    stride, nll = seqlen - 1, 0.0
    with torch.no_grad():
        for i in range(windows):
            w = ids[None, i * stride: i * stride + seqlen]
            nll += shifted_nll(model(w).logits, w)
    return {"ppl": math.exp(nll / (windows * stride)), "windows": windows, "seqlen": seqlen, "stride": stride}


def stage_agree(row: dict, ctx: dict) -> None:
    """prunekit's perplexity on llama-perplexity's own windows, and greedy text against PyTorch's (f32 GGUF)."""
    f32 = row["llamacpp"]["f32"]
    path = Path(row["gguf"]["f32"]["path"])
    model, tok = prunekit.load_model(row["model"])
    f32["prunekit_same_windows"] = ppl_llamacpp_windows(model, tok)
    ids = tok(GEN_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=GEN_TOKENS, pad_token_id=tok.eos_token_id)
    ours = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    theirs = lt.generate(path, GEN_PROMPT, tokens=GEN_TOKENS, kv="f32")
    a, b = ours.split(), theirs["text"].split()
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    f32["greedy"] = {"prunekit": ours, "llamacpp": theirs["text"], "command": theirs["command"],
                     "same_words": same, "words": min(len(a), len(b))}
    del model


STAGES = ("model", "quality", "export", "check", "speed", "agree")
#: the stages each one needs (speed needs only the exported files; agree the check's cells)
NEEDS = {"model": (), "quality": ("model",), "export": ("model",), "check": ("quality", "export"),
         "speed": ("export",), "agree": ("check",)}


def _slug(label: str) -> str:
    return label.replace("/", "_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=None, help="labels (default: dense + every ROWS entry)")
    ap.add_argument("--recovered", action="store_true", help="add every folder under /work/artifacts/recovered")
    ap.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    ap.add_argument("--redo", nargs="*", default=[], help="LABEL:STAGE to measure again")
    ap.add_argument("--work", default="/work/artifacts/deploy", help="models and GGUF files (outside the repo)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop at a stage boundary after this long")
    ap.add_argument("--out", default=str(RESULTS / "deploy"))
    ap.add_argument("--quants", nargs="*", default=list(QUANTS), choices=QUANTS,
                    help="speed stage: only these (the stage stays open until every quantization is measured)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = Path(args.work)
    for sub in ("models", "gguf", "logits"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    labels = args.rows if args.rows is not None else ["dense", *ROWS]
    if args.recovered:
        rec = Path(os.environ.get("PRUNEKIT_RECOVERED", "/work/artifacts/recovered"))
        labels += [f"recovered/{p.name}" for p in sorted(rec.iterdir()) if (p / "config.json").is_file()] \
            if rec.is_dir() else []
    if "dense" not in labels:
        labels.insert(0, "dense")
    data = load_json(args.out + ".json", {"rows": {}, "runs": []})
    for item in args.redo:
        label, stage = item.rsplit(":", 1)
        data["rows"].get(label, {}).setdefault("done", [])
        data["rows"][label]["done"] = [s for s in data["rows"][label]["done"] if s != stage]
        data["rows"][label].pop({"quality": "prunekit_ppl", "check": "llamacpp"}.get(stage, stage), None)
    simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    run = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python " + " ".join(map(shlex.quote, sys.argv)),
           "environment": environment(), "cpu_flags": simd, "llama_cpp": _build_info(),
           "loadavg_start": os.getloadavg()[0]}
    data["runs"].append(run)
    _, tok = prunekit.load_model("smollm2-135m")
    text_file = work / "wikitext2.test.txt"
    if not text_file.is_file():
        from prunekit.data import get_dataset

        text_file.write_text(get_dataset("wikitext2").eval_text("test"))
    ctx = {"work": work, "text_file": text_file, "prompt_ids": eval_token_ids(tok, "wikitext2", 1024)[:PROMPT_TOKENS]}
    for label in labels:
        spec = row_spec(label, work)
        row = data["rows"].setdefault(label, {"label": label, "kind": spec["kind"], "done": []})
        for stage in args.stages:
            if stage in row["done"] or ("+" in label and stage not in ("model", "quality")):
                continue  # a "+m32" row is there for the width multiple's quality cost only
            missing = [p for p in NEEDS[stage] if p not in row["done"]]
            if missing:
                print(f"== {label}: {stage} skipped ({', '.join(missing)} not done yet)")
                continue
            if args.max_minutes and (time.perf_counter() - t_start) / 60 > args.max_minutes:
                print(f"stopping at {label}:{stage} after {args.max_minutes} min (resume with the same command)")
                _write(data, args)
                return
            print(f"== {label}: {stage}", flush=True)
            t0 = time.perf_counter()
            if stage == "model":
                stage_model(row, spec)
            elif stage == "quality":
                stage_quality(row, ctx)
            elif stage == "export":
                stage_export(row, ctx)
            elif stage == "check":
                stage_check(row, ctx)
            elif stage == "agree":
                stage_agree(row, ctx)
            else:
                dense = data["rows"]["dense"]
                if "export" not in dense["done"]:
                    raise SystemExit("the dense row must be exported before any speed stage")
                if not stage_speed(row, dense, args.quants):
                    row.setdefault("stage_s", {})["speed_partial"] = time.perf_counter() - t0
                    _write(data, args)
                    continue
            row.setdefault("stage_s", {})[stage] = time.perf_counter() - t0
            row["done"].append(stage)
            row.setdefault("runs", []).append(len(data["runs"]) - 1)
            _write(data, args)
    run["loadavg_end"] = os.getloadavg()[0]
    _write(data, args)


def _build_info() -> dict:
    f = llamacpp.cache_dir() / "build.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _write(data: dict, args) -> None:
    write_results(args.out, data, render)


if __name__ == "__main__":
    main()
