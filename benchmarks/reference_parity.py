"""Parity of prunekit's magnitude / Wanda / SparseGPT with the public reference implementations.

Runs the reference pruning code itself (``locuslab/wanda`` ``lib/prune.py``: ``prune_magnitude``,
``prune_wanda``; ``IST-DASLab/sparsegpt`` ``llama.py``: ``llama_sequential`` with its ``SparseGPT``
class) and prunekit's ``prune`` on the same model with the *same* calibration token ids, then
scores both with the same WikiText-2 evaluator and compares the masks layer by layer.

The reference code is imported from work trees you point at (``--wanda-repo``,
``--sparsegpt-repo``; e.g. ``git archive`` extracts under /tmp). It is never copied into this
repository. Old reference code assumes CUDA and an older transformers; the run-time shims below
bridge that without touching the pruning maths (each is recorded in the results):

* ``datasets`` stub in ``sys.modules`` if it is not installed (wanda's ``lib/data.py`` imports
  it at module level; its loaders are never called here).
* wanda's ``lib.prune.get_loaders`` is replaced by one that returns our calibration ids in
  wanda's loader format (``[(ids[i:i+1], target), ...]``).
* ``model.hf_device_map = {}`` and ``model.seqlen = <calibration seqlen>`` (wanda/SparseGPT
  read these attributes set by their own model loaders).
* Decoder-layer shim: transformers >= 4.48 Llama layers need ``position_embeddings`` (cos, sin)
  from the model's rotary module and return a tensor; the reference calls
  ``layer(x, attention_mask=..., position_ids=...)[0]``. While the reference runs, every decoder
  layer's ``forward`` is wrapped to fill ``position_ids`` (default ``arange``, what old
  transformers did when SparseGPT's catcher did not pass them) and ``position_embeddings =
  model.model.rotary_emb(x, position_ids)``, and to return a 1-tuple.
* ``torch.Tensor.cuda`` → identity (wanda's ``prune_magnitude`` sorts on ``.cuda()``) and
  ``torch.cuda.synchronize`` / ``torch.cuda.empty_cache`` → no-ops, on a CPU-only torch.
* SparseGPT's ``llama.py`` reads a module-global ``args`` (set under ``__main__`` there); it is
  set on the module.

Usage (heavy: run under the shared lock)::

    git --git-dir=<mirror of locuslab/wanda> archive HEAD | tar -x -C /tmp/refs/wanda
    git --git-dir=<mirror of IST-DASLab/sparsegpt> archive HEAD | tar -x -C /tmp/refs/sparsegpt
    flock /tmp/prunekit-heavy.lock python benchmarks/reference_parity.py \\
        --wanda-repo /tmp/refs/wanda --sparsegpt-repo /tmp/refs/sparsegpt
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import subprocess
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import torch
from torch import nn

import common

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = ("unstructured", "2:4")


# --------------------------------------------------------------------------------------------
# shims
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cpu_cuda_shims():
    """CUDA calls the reference code makes, as no-ops on a CPU-only torch (restored on exit)."""
    saved = (torch.Tensor.cuda, torch.cuda.synchronize, torch.cuda.empty_cache)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.empty_cache = lambda *a, **k: None
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize, torch.cuda.empty_cache = saved


@contextlib.contextmanager
def reference_model_shims(model: nn.Module, seqlen: int):
    """Attributes and a decoder-layer calling convention the reference code expects."""
    rotary = model.model.rotary_emb
    layers = list(model.model.layers)
    model.seqlen = seqlen
    model.hf_device_map = {}

    def wrap(layer: nn.Module):
        orig = layer.forward  # the bound class method

        def forward(hidden_states, *args, attention_mask=None, position_ids=None, **kwargs):
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            if kwargs.get("position_embeddings") is None:
                kwargs["position_embeddings"] = rotary(hidden_states, position_ids)
            out = orig(hidden_states, *args, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
            return out if isinstance(out, tuple) else (out,)

        layer.forward = forward

    for layer in layers:
        wrap(layer)
    try:
        yield
    finally:
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
        for attr in ("seqlen", "hf_device_map"):
            if attr in model.__dict__:
                delattr(model, attr)


def import_references(wanda_dir: Path, sparsegpt_dir: Path):
    """Import wanda's ``lib.prune`` / ``lib.eval`` and SparseGPT's ``llama`` from their work trees."""
    for d, probe in ((wanda_dir, "lib/prune.py"), (sparsegpt_dir, "llama.py")):
        if not (d / probe).is_file():
            raise FileNotFoundError(f"{d / probe} not found: pass the reference work tree (see --help)")
    try:
        import datasets  # noqa: F401
    except ImportError:  # wanda's lib/data.py imports it at module level; never called here
        stub = types.ModuleType("datasets")
        stub.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("datasets stub"))
        sys.modules["datasets"] = stub
    sys.path.insert(0, str(wanda_dir))
    sys.path.insert(0, str(sparsegpt_dir))
    import importlib

    wprune = importlib.import_module("lib.prune")
    weval = importlib.import_module("lib.eval")
    with contextlib.redirect_stdout(io.StringIO()):
        sllama = importlib.import_module("llama")
    return wprune, weval, sllama


def reference_id(d: Path, files: tuple[str, ...], commit: str | None) -> dict:
    """The commit (given, or the work tree's HEAD) and sha256 of the files whose code runs."""
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = None
    return {"commit": commit, "sha256": {f: hashlib.sha256((d / f).read_bytes()).hexdigest()[:16] for f in files}}


# --------------------------------------------------------------------------------------------
# the two sides
# --------------------------------------------------------------------------------------------
def run_reference(refs, model, tok, method: str, pattern: str, calib: torch.Tensor, log: io.StringIO) -> None:
    wprune, _, sllama = refs
    n, m = (0, 0) if pattern == "unstructured" else map(int, pattern.split(":"))
    nsamples, seqlen = calib.shape
    loader = [(calib[i : i + 1].clone(), None) for i in range(nsamples)]
    args = Namespace(sparsity_ratio=0.5, nsamples=nsamples, seed=0, use_variant=False)
    wprune.get_loaders = lambda *a, **k: (loader, None)
    with cpu_cuda_shims(), reference_model_shims(model, seqlen), contextlib.redirect_stdout(log), torch.no_grad():
        if method == "magnitude":
            wprune.prune_magnitude(args, model, tok, torch.device("cpu"), prune_n=n, prune_m=m)
        elif method == "wanda":
            wprune.prune_wanda(args, model, tok, torch.device("cpu"), prune_n=n, prune_m=m)
        elif method == "sparsegpt":
            sllama.args = Namespace(nsamples=nsamples, true_sequential=False, minlayer=-1, maxlayer=1000,
                                    prune_only="", invert=False, wbits=16, sparsity=0.5, prunen=n, prunem=m,
                                    percdamp=0.01, blocksize=128)
            sllama.llama_sequential(model, loader, torch.device("cpu"))
        else:
            raise ValueError(method)


def run_ours(model, method: str, pattern: str, calib: torch.Tensor, batch_size: int) -> dict:
    import prunekit

    cfg = prunekit.PruneConfig(method=method, sparsity=0.5, pattern=pattern,
                               calib=prunekit.CalibConfig(nsamples=calib.shape[0], seqlen=calib.shape[1],
                                                          batch_size=batch_size))
    rep = prunekit.prune(model, cfg, calib=calib)
    return {"sparsity": rep.sparsity}


# --------------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------------
def snapshot(linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {k: mod.weight.detach().clone() for k, mod in linears.items()}


def restore(linears: dict[str, nn.Module], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, mod in linears.items():
            mod.weight.data = saved[k].clone()


def overall_sparsity(linears: dict[str, nn.Module]) -> float:
    zeros = sum(int((mod.weight == 0).sum()) for mod in linears.values())
    return zeros / sum(mod.weight.numel() for mod in linears.values())


def compare_layers(linears, ref_w: dict[str, torch.Tensor]) -> dict:
    """Per layer: share of identical keep/prune decisions and relative weight difference."""
    agree, wdiff = {}, {}
    for k, mod in linears.items():
        w, r = mod.weight.detach(), ref_w[k]
        agree[k] = float(((w == 0) == (r == 0)).float().mean())
        wdiff[k] = float(torch.linalg.vector_norm(w - r) / torch.linalg.vector_norm(r).clamp_min(1e-30))
    vals = list(agree.values())
    return {
        "mask_agreement_mean": sum(vals) / len(vals),
        "mask_agreement_min": min(vals),
        "mask_agreement_min_layer": min(agree, key=agree.get),
        "layers_identical_masks": sum(v == 1.0 for v in vals),
        "layers": len(vals),
        "weight_rel_diff_max": max(wdiff.values()),
        "weight_rel_diff_mean": sum(wdiff.values()) / len(wdiff),
        "per_layer_mask_agreement": agree,
    }


def ppl(model, eval_ids: torch.Tensor, seqlen: int, windows: int) -> float:
    from prunekit.eval.perplexity import perplexity_of_ids

    return perplexity_of_ids(model, eval_ids, seqlen, windows, name="wikitext2").ppl


def reference_formula_ppl(refs, model, eval_ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """Dense perplexity by wanda's ``eval_ppl_wikitext`` (checks our formula against theirs)."""
    _, weval, _ = refs
    enc = Namespace(input_ids=eval_ids[: windows * seqlen].unsqueeze(0))
    model.seqlen = seqlen
    try:
        with cpu_cuda_shims(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            return float(weval.eval_ppl_wikitext(model, enc, 1, torch.device("cpu")))
    finally:
        del model.seqlen


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wanda-repo", type=Path, required=True, help="work tree of locuslab/wanda (outside this repo)")
    ap.add_argument("--sparsegpt-repo", type=Path, required=True, help="work tree of IST-DASLab/sparsegpt")
    ap.add_argument("--wanda-commit", default=None, help="commit the wanda tree was extracted from (if not a git tree)")
    ap.add_argument("--sparsegpt-commit", default=None, help="commit the sparsegpt tree was extracted from")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-dataset", default="austen")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="prunekit's calibration batch size")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-windows", type=int, default=20)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=PATTERNS)
    ap.add_argument("--calib-ids", type=Path, default=Path("/tmp/prunekit_reference_parity_calib.pt"),
                    help="where the shared calibration ids are saved (.pt)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "reference_parity")
    ap.add_argument("--threshold", type=float, default=0.01, help="max relative ppl difference (issue 2: 1%%)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out's JSON (same settings)")
    a = ap.parse_args(argv)

    import prunekit
    from prunekit.config import CalibConfig
    from prunekit.data import calibration_ids
    from prunekit.eval.perplexity import eval_token_ids
    from prunekit.models import decoder_linears
    from prunekit.report import environment

    refs = import_references(a.wanda_repo.resolve(), a.sparsegpt_repo.resolve())
    torch.manual_seed(0)
    model, tok = prunekit.load_model(a.model, "float32", "cpu")
    calib = calibration_ids(CalibConfig(dataset=a.calib_dataset, nsamples=a.nsamples, seqlen=a.calib_seqlen,
                                        seed=a.seed), tok, a.data_dir)
    torch.save(calib, a.calib_ids)
    eval_ids = eval_token_ids(tok, "wikitext2", a.eval_seqlen, a.data_dir)
    linears = decoder_linears(model)
    dense = snapshot(linears)

    settings = dict(model=a.model, dtype="float32", device="cpu", calib_dataset=a.calib_dataset,
                    nsamples=a.nsamples, calib_seqlen=a.calib_seqlen, seed=a.seed, prunekit_batch_size=a.batch_size,
                    sparsity=0.5, eval_dataset="wikitext2", eval_seqlen=a.eval_seqlen, eval_windows=a.max_windows,
                    calib_ids_sha256=hashlib.sha256(calib.numpy().tobytes()).hexdigest(),
                    threshold=a.threshold)
    json_path = a.out.with_suffix(".json")
    result = None
    if a.resume and json_path.is_file():
        old = json.loads(json_path.read_text())
        same = {k: v for k, v in old["settings"].items() if k != "threshold"} == \
            {k: v for k, v in settings.items() if k != "threshold"}
        if not same:
            raise ValueError(f"--resume: {json_path} was made with other settings; drop --resume or change --out")
        result = old
        result.setdefault("commands", [result.get("command")])
        result["commands"].append(command_line(argv))
        print(f"resuming: {len(result['rows'])} rows already in {json_path}")
    if result is None:
        t = time.perf_counter()
        dense_ppl = ppl(model, eval_ids, a.eval_seqlen, a.max_windows)
        dense_ref_formula = reference_formula_ppl(refs, model, eval_ids, a.eval_seqlen, a.max_windows)
        print(f"dense: ppl {dense_ppl:.4f} (wanda eval_ppl_wikitext: {dense_ref_formula:.4f}) "
              f"[{time.perf_counter() - t:.0f}s]", flush=True)
        result = dict(
            commands=[command_line(argv)], settings=settings, environment=environment(),
            references={
                "locuslab/wanda": reference_id(a.wanda_repo, ("lib/prune.py", "lib/layerwrapper.py", "lib/eval.py"),
                                               a.wanda_commit),
                "IST-DASLab/sparsegpt": reference_id(a.sparsegpt_repo, ("sparsegpt.py", "llama.py"),
                                                     a.sparsegpt_commit),
            },
            reference_entry_points={"magnitude": "wanda lib/prune.py prune_magnitude",
                                    "wanda": "wanda lib/prune.py prune_wanda",
                                    "sparsegpt": "sparsegpt llama.py llama_sequential (SparseGPT.fasterprune)"},
            shims=SHIMS, dense_ppl=dense_ppl, dense_ppl_reference_formula=dense_ref_formula, rows=[],
        )
    result["settings"]["threshold"] = a.threshold
    done = {(r["method"], r["pattern"]) for r in result["rows"]}

    for method in a.methods:
        for pattern in a.patterns:
            if (method, pattern) in done:
                continue
            log = io.StringIO()
            restore(linears, dense)
            t0 = time.perf_counter()
            run_reference(refs, model, tok, method, pattern, calib, log)
            t_ref = time.perf_counter() - t0
            ref_sp = overall_sparsity(linears)
            ref_ppl = ppl(model, eval_ids, a.eval_seqlen, a.max_windows)
            ref_w = snapshot(linears)

            restore(linears, dense)
            t0 = time.perf_counter()
            run_ours(model, method, pattern, calib, a.batch_size)
            t_ours = time.perf_counter() - t0
            our_sp = overall_sparsity(linears)
            our_ppl = ppl(model, eval_ids, a.eval_seqlen, a.max_windows)
            cmp = compare_layers(linears, ref_w)
            del ref_w
            rel = (our_ppl - ref_ppl) / ref_ppl
            row = dict(method=method, pattern=pattern, ppl_ours=our_ppl, ppl_reference=ref_ppl, rel_diff=rel,
                       within_threshold=abs(rel) <= a.threshold, sparsity_ours=our_sp, sparsity_reference=ref_sp,
                       seconds_ours=t_ours, seconds_reference=t_ref, **cmp)
            result["rows"].append(row)
            print(f"{method:9s} {pattern:12s} ours {our_ppl:9.4f}  ref {ref_ppl:9.4f}  rel {rel:+.4%}  "
                  f"mask agree mean {cmp['mask_agreement_mean']:.6f} min {cmp['mask_agreement_min']:.6f}  "
                  f"sparsity {our_sp:.6f}/{ref_sp:.6f}  [{t_ref:.0f}s ref, {t_ours:.0f}s ours]", flush=True)
            write_results(result, a.out)  # after every row, so an interrupted run keeps what it measured
    restore(linears, dense)
    write_results(result, a.out)
    print(f"wrote {a.out.with_suffix('.md')} and .json")
    return 0 if result["all_within_threshold"] else 1


def command_line(argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return "python benchmarks/reference_parity.py " + " ".join(args)


def write_results(result: dict, out: Path) -> None:
    order = {(m, p): i for i, (m, p) in enumerate((m, p) for m in METHODS for p in PATTERNS)}
    result["rows"].sort(key=lambda r: order.get((r["method"], r["pattern"]), 99))
    result["all_within_threshold"] = all(r["within_threshold"] for r in result["rows"])
    result["complete"] = len(result["rows"]) == len(order)
    out.parent.mkdir(parents=True, exist_ok=True)
    common.write_results(out.with_suffix(""), result, render_md)


SHIMS = [
    "sys.modules['datasets'] stub when datasets is not installed (wanda lib/data.py imports it; unused)",
    "wanda lib.prune.get_loaders -> our calibration ids as [(ids[i:i+1], None)]",
    "model.hf_device_map = {} and model.seqlen = calibration seqlen (attributes the reference loaders set)",
    "decoder-layer forward wrapper during the reference run: position_ids default arange, "
    "position_embeddings = model.model.rotary_emb(x, position_ids), output wrapped in a 1-tuple",
    "torch.Tensor.cuda -> identity, torch.cuda.synchronize / empty_cache -> no-op (CPU-only torch)",
    "sparsegpt llama.py module-global args set to the README's defaults (percdamp .01, blocksize 128, "
    "no true-sequential, wbits 16)",
]


def render_md(r: dict) -> str:
    s = r["settings"]
    env = r["environment"]
    lines = [
        "# Reference parity: prunekit vs locuslab/wanda and IST-DASLab/sparsegpt",
        "",
        f"Model {s['model']} ({s['dtype']}, {s['device']}); calibration: {s['nsamples']} x {s['calib_seqlen']} tokens "
        f"of `{s['calib_dataset']}` (seed {s['seed']}, the same ids for both sides, sha256 "
        f"`{s['calib_ids_sha256'][:16]}…`); sparsity {s['sparsity']}; WikiText-2 perplexity at seqlen "
        f"{s['eval_seqlen']}, first {s['eval_windows']} windows, the same evaluator for both sides.",
        "",
        f"Dense: {r['dense_ppl']:.4f} (prunekit's evaluator) vs {r['dense_ppl_reference_formula']:.4f} "
        "(wanda's `eval_ppl_wikitext` on the same ids).",
        "",
        "| method | pattern | prunekit ppl | reference ppl | rel. diff | mask agreement (mean / min) | "
        "identical-mask layers | weight rel. diff (max) | sparsity ours / ref | prune s ours / ref |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['method']} | {x['pattern']} | {x['ppl_ours']:.4f} | {x['ppl_reference']:.4f} | "
            f"{x['rel_diff']:+.3%} | {x['mask_agreement_mean']:.6f} / {x['mask_agreement_min']:.6f} | "
            f"{x['layers_identical_masks']}/{x['layers']} | {x['weight_rel_diff_max']:.2e} | "
            f"{x['sparsity_ours']:.6f} / {x['sparsity_reference']:.6f} | {x['seconds_ours']:.0f} / "
            f"{x['seconds_reference']:.0f} ({x['seconds_ours'] / x['seconds_reference']:.2f}x) |"
        )
    lines += [
        "",
        f"All within {s['threshold']:.0%}: **{r['all_within_threshold']}**"
        + ("" if r.get("complete") else " (incomplete run: only the rows above were measured)") + ".",
        "",
        "Reference commits: " + ", ".join(f"{k} `{v['commit']}`" for k, v in r["references"].items()) + ".",
        "Entry points: " + "; ".join(f"{k}: {v}" for k, v in r["reference_entry_points"].items()) + ".",
        "",
        "Run-time shims applied to the reference code (none changes its pruning maths):",
        "",
        *[f"- {x}" for x in r["shims"]],
        "",
        f"Environment: prunekit {env.get('prunekit')}, torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, Python {env.get('python')}, {env.get('processor')} ({env.get('threads')} threads).",
        "",
        "Command(s) (`flock /tmp/prunekit-heavy.lock` in front; later ones resumed with `--resume`):",
        "",
        *[f"    {c}" for c in r["commands"]],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
