"""Parity of prunekit's ALPS and RIA with the reference code (run from work trees you point at, never copied).

* **ALPS** (mazumder-lab/ALPS ``alps.py``, ``ALPS_prune.ALPS_admm``), layer by layer: the reference
  and :func:`prunekit.methods.alps.alps_prune` get the *same* ``X^T X`` (collected by prunekit on
  SmolLM2-135M's block 0 from Austen calibration ids) and the same dense weight; the pruned weights
  are compared value by value (70 % unstructured and 2:4, q_proj and down_proj).
* **RIA** (biomedical-cybernetics/Relative-importance-and-activation-pruning ``lib/prune.py``,
  ``prune_ria``), whole model: the reference's sequential pruner and ``prunekit.prune(method="ria")``
  prune the same tiny random Llama (built from a config, no download) on the same calibration ids,
  unstructured (per matrix), 2:4, and 2:4 with channel reallocation + linear sum assignment
  (``--reallocation --lsa``, prunekit's ``permute=true``); masks are compared layer by layer.

Run-time shims (recorded in the results): ``alps.dev = "cpu"``; ``Tensor.to("cuda:N")`` → CPU;
``torch.cuda.synchronize`` / ``empty_cache`` no-ops; a ``datasets`` stub; RIA's ``get_loaders``
returns our ids; the decoder-layer calling convention of benchmarks/reference_parity.py::

    git --git-dir=<mirror of mazumder-lab/ALPS> archive HEAD | tar -x -C /tmp/refs/alps
    git --git-dir=<mirror of biomedical-cybernetics/Relative-importance-...> archive HEAD | tar -x -C /tmp/refs/ria
    python benchmarks/parity_one_shot.py --alps-repo /tmp/refs/alps --ria-repo /tmp/refs/ria
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import re
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import write_results  # noqa: E402
from reference_parity import cpu_cuda_shims, reference_id, reference_model_shims  # noqa: E402

RESULTS = HERE / "results"


@contextlib.contextmanager
def cuda_strings_to_cpu():
    """``tensor.to("cuda:N")`` (hard-coded in both references) goes to the CPU instead."""
    orig = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return orig(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = orig


def datasets_stub() -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")
        stub.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("datasets stub"))
        sys.modules["datasets"] = stub


def block0_hessians(nsamples: int, seqlen: int) -> tuple[dict, dict, str]:
    """SmolLM2's block-0 q_proj and down_proj: dense weights and prunekit's ``X^T X`` on Austen ids."""
    import prunekit
    from prunekit import CalibConfig
    from prunekit.calibration.context import calibration_forward_context, capture_block_inputs
    from prunekit.data import calibration_ids
    from prunekit.methods.base import InputStats
    from prunekit.models import find_blocks

    model, tok = prunekit.load_model("smollm2-135m")
    ids = calibration_ids(CalibConfig(dataset="austen", nsamples=nsamples, seqlen=seqlen), tok)
    _, blocks = find_blocks(model)
    names = {"q_proj": blocks[0].self_attn.q_proj, "down_proj": blocks[0].mlp.down_proj}
    stats = {k: InputStats(m.in_features, torch.device("cpu"), hessian=True) for k, m in names.items()}
    hooks = [m.register_forward_pre_hook(lambda _m, a, _k=k: stats[_k].update(a[0])) for k, m in names.items()]
    with calibration_forward_context(model):
        inputs = capture_block_inputs(model, blocks, ids, 8, torch.device("cpu"))
        for b in range(inputs.batches):
            inputs.call(0, blocks[0], b)
    for h in hooks:
        h.remove()
    return ({k: m.weight.detach().clone() for k, m in names.items()}, {k: s.hessian() for k, s in stats.items()},
            f"austen {nsamples}x{seqlen}")


def alps_parity(repo: Path, nsamples: int, seqlen: int) -> dict:
    from prunekit.masks import Pattern
    from prunekit.methods.alps import alps_prune

    sys.path.insert(0, str(repo))
    ref = importlib.import_module("alps")
    ref.dev = "cpu"
    weights, hessians, calib = block0_hessians(nsamples, seqlen)
    rows = []
    for name in weights:
        for sp, n, m in ((0.7, 0, 0), (0.5, 2, 4)):
            w, h = weights[name], hessians[name]
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
            layer.weight.data = w.clone()
            pr = ref.ALPS_prune(layer, nsamples, seqlen)
            pr.XtX = h.clone()
            t0 = time.perf_counter()
            with cpu_cuda_shims(), cuda_strings_to_cpu(), contextlib.redirect_stdout(io.StringIO()):
                pr.ALPS_admm(sp=sp, nm_n=n, nm_m=m, rho=0.1)
            t_ref = time.perf_counter() - t0
            theirs = layer.weight.data
            t0 = time.perf_counter()
            ours, info = alps_prune(w.clone(), h.clone(), sp, Pattern("nm", n, m) if n else Pattern())
            t_ours = time.perf_counter() - t0
            rows.append({"layer": f"model.layers.0.{'self_attn' if name == 'q_proj' else 'mlp'}.{name}",
                         "pattern": f"{n}:{m}" if n else f"{sp:.0%}", "identical": bool(torch.equal(ours, theirs)),
                         "same_support": bool(torch.equal(ours == 0, theirs == 0)),
                         "max_abs_diff": float((ours - theirs).abs().max()),
                         "kept": int((ours != 0).sum()), "numel": ours.numel(), "admm_iters": info["iters"],
                         "reference_s": t_ref, "prunekit_s": t_ours})
    return {"calibration": calib, "rows": rows,
            "reference": reference_id(repo, ("alps.py",), None)}


def swaps_candidates(nsamples: int, seqlen: int, iters: int = 20) -> dict:
    """SparseSwaps' exact search against the candidate search (K kept x K pruned) on real Hessians:
    the layer error after ``iters`` iterations from Wanda's 70 % mask, and the time."""
    from prunekit.masks import Pattern, keep_mask
    from prunekit.methods.swaps import sparse_swaps

    weights, hessians, calib = block0_hessians(nsamples, seqlen)
    rows = []
    for name in weights:
        w, h = weights[name], hessians[name]
        cur = w * keep_mask(w.abs() * torch.sqrt(torch.diag(h)), 0.7, Pattern(), per_row=True)
        for k in (0, 128, 64, 16):
            t0 = time.perf_counter()
            _, info = sparse_swaps(w, cur, h, max_iters=iters, candidates=k)
            rows.append({"layer": name, "candidates": k or "exact", "iters": iters, "swaps": info["swaps"],
                         "error_before": info["error_before"], "error_after": info["error_after"],
                         "seconds": time.perf_counter() - t0})
    return {"calibration": calib, "mask": "Wanda 70 % (per row)", "rows": rows}


def _tiny(seed: int = 0):
    from conftest import tiny_model

    return tiny_model("llama", seed=seed, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                      num_key_value_heads=4)


def _reference_lsa_scores(printed: str, m: int) -> list[float]:
    """The reference's printed total after its last LSA round, one per layer in pruning order."""
    pat = re.compile(rf"linear sum assignment round {m - 1}: ([0-9.eE+-]+)")
    return [float(v) for v in pat.findall(printed)]


def ria_parity(repo: Path, nsamples: int, seqlen: int) -> dict:
    import prunekit
    from prunekit.models import decoder_linears

    datasets_stub()
    sys.path.insert(0, str(repo))
    for mod in [k for k in sys.modules if k == "lib" or k.startswith("lib.")]:
        del sys.modules[mod]  # another reference's ``lib`` package (wanda) must not shadow RIA's
    rprune = importlib.import_module("lib.prune")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (nsamples, seqlen), generator=g)
    loader = [(ids[i:i + 1].clone(), None) for i in range(nsamples)]
    rprune.get_loaders = lambda *a, **k: (loader, None)
    rows = []
    for label, pattern, opts in (("unstructured 50%", "unstructured", {}), ("2:4", "2:4", {}),
                                 ("2:4 + reallocation + LSA", "2:4", {"permute": True})):
        base = _tiny()
        theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
        n, m = (0, 0) if pattern == "unstructured" else (2, 4)
        args = Namespace(calib_dataset="c4", nsamples=nsamples, seed=0, seqlen=seqlen, sparsity_ratio=0.5,
                         prune_method="ria", a=0.5, reconstruction=False, gptq=False, semi_sparse_acc=False,
                         per_outneuron=False, reallocation=bool(opts), lsa=bool(opts), importance_score="sum",
                         fast=False, model="tiny-llama")
        printed = io.StringIO()
        with cpu_cuda_shims(), cuda_strings_to_cpu(), reference_model_shims(theirs, seqlen), \
                contextlib.redirect_stdout(printed), torch.no_grad():
            rprune.prune_ria(args, theirs, None, torch.device("cpu"), prune_n=n, prune_m=m)
        cfg = prunekit.PruneConfig(method="ria", sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
                                   method_options=opts, calib={"batch_size": 1})
        report = prunekit.prune(ours, cfg, calib=ids)
        la, lb = decoder_linears(ours), decoder_linears(theirs)
        per = {k: {"identical_mask": bool(torch.equal(la[k].weight == 0, lb[k].weight == 0)),
                   "differing": int(((la[k].weight == 0) != (lb[k].weight == 0)).sum()),
                   "pruned_prunekit": int((la[k].weight == 0).sum()), "pruned_reference": int((lb[k].weight == 0).sum())}
               for k in la}
        if opts:  # the score each layer's N:M mask keeps after the last LSA round, both sides
            final = _reference_lsa_scores(printed.getvalue(), m)
            mine = {layer.name: layer.info["kept_score_lsa"] for layer in report.layers}
            for (k, v), theirs_score in zip(per.items(), final):  # both in module order
                v["kept_score_prunekit"], v["kept_score_reference"] = mine[k], theirs_score
        rows.append({"setting": label, "layers": len(per), "identical": sum(v["identical_mask"] for v in per.values()),
                     "per_layer": per})
    return {"model": "tiny random Llama (hidden 256, FFN 512, 2 blocks, 8 heads / 4 kv)",
            "calibration": f"{nsamples}x{seqlen} random ids, seed 0", "rows": rows,
            "reference": reference_id(repo, ("lib/prune.py", "lib/layerwrapper.py"), None)}


def _ria_lsa_lines(rows: list[dict]) -> list[str]:
    per = next((row["per_layer"] for row in rows if "reallocation" in row["setting"]), {})
    first = next(iter(per.items()), None)
    if first is None or "kept_score_reference" not in first[1]:
        return []
    name, v = first
    return [f"With reallocation + LSA, the first layer ({name}, identical inputs on both sides) keeps a total score of "
            f"{v['kept_score_prunekit']:.3f} (prunekit) vs {v['kept_score_reference']:.3f} (reference) after the last "
            "LSA round: both solve each round's assignment exactly, but on score matrices summed in a different "
            "float32 order, so near-ties can go the other way and the greedy rounds then follow different paths. "
            "Later blocks differ because their calibration inputs come from the differently pruned first block.", ""]


def render(res: dict) -> str:
    out = ["# Parity with the reference code: ALPS and RIA", "",
           f"Command: `{res['command']}` — {res['when']}, {res['machine']}", ""]
    a = res.get("alps")
    if a:
        out += ["## ALPS (mazumder-lab/ALPS `ALPS_prune.ALPS_admm`, rho 0.1), same X^T X and weight", "",
                f"Reference commit {a['reference']['commit']}; X^T X from SmolLM2-135M block 0, {a['calibration']}.",
                "", "| layer | pattern | identical weights | same support | max abs diff | kept / numel | ADMM iters "
                "| reference s | prunekit s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            out.append(f"| {r['layer']} | {r['pattern']} | {r['identical']} | {r['same_support']} | "
                       f"{r['max_abs_diff']:.3g} | {r['kept']} / {r['numel']} | {r['admm_iters']} | "
                       f"{r['reference_s']:.1f} | {r['prunekit_s']:.1f} |")
        out.append("")
    sw = res.get("swaps")
    if sw:
        out += ["## SparseSwaps: exact search against K x K candidates (SmolLM2 block 0, real X^T X)", "",
                f"Start: {sw['mask']}; {sw['calibration']}.", "",
                "| layer | search | iterations | swaps | layer error before → after | seconds |", "|---|---|---|---|---|---|"]
        for r in sw["rows"]:
            out.append(f"| {r['layer']} | {r['candidates']} | {r['iters']} | {r['swaps']} | {r['error_before']:.4f} → "
                       f"{r['error_after']:.4f} | {r['seconds']:.1f} |")
        out.append("")
    r = res.get("ria")
    if r:
        out += ["## RIA (biomedical-cybernetics/Relative-importance-and-activation-pruning `prune_ria`, a = 0.5)", "",
                f"Reference commit {r['reference']['commit']}; {r['model']}; calibration {r['calibration']}.", "",
                "| setting | layers with identical masks | weights decided differently (per layer) |", "|---|---|---|"]
        for row in r["rows"]:
            diffs = ", ".join(str(v["differing"]) for v in row["per_layer"].values())
            out.append(f"| {row['setting']} | {row['identical']} / {row['layers']} | {diffs} |")
        out.append("")
        out += _ria_lsa_lines(r["rows"])
    out += ["Shims: " + "; ".join(res["shims"]), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alps-repo", type=Path)
    ap.add_argument("--ria-repo", type=Path)
    ap.add_argument("--swaps", action="store_true", help="also SparseSwaps' exact vs candidate search")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from prunekit.report import environment

    env = environment()
    res = {"command": "python benchmarks/parity_one_shot.py " + " ".join(argv or sys.argv[1:]),
           "when": time.strftime("%F %T"), "machine": f"{env['processor']}, {env['threads']} threads, torch "
           f"{env['torch']}, transformers {env['transformers']}",
           "shims": ["alps.dev = 'cpu'", "Tensor.to('cuda:N') -> cpu", "torch.cuda.synchronize/empty_cache no-ops",
                     "datasets stub", "RIA get_loaders returns our ids", "decoder-layer convention of "
                     "reference_parity.py (position ids and rotary embeddings filled in, tuple returned)"]}
    if args.alps_repo:
        res["alps"] = alps_parity(args.alps_repo, args.nsamples, args.seqlen)
    if args.swaps:
        res["swaps"] = swaps_candidates(args.nsamples, args.seqlen)
    if args.ria_repo:
        res["ria"] = ria_parity(args.ria_repo, 8, 64)
    RESULTS.mkdir(exist_ok=True)
    write_results(RESULTS / "one_shot_parity", res, render)
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
