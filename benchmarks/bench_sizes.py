"""Checkpoint sizes: SmolLM2-135M saved dense and compressed, at several sparsities, fp32 and bf16.

For dense / unstructured 50 % / 70 % / 2:4 / 4:8 (magnitude pruning: a folder's size depends only
on how many weights are zero and where, not on which criterion chose them) and each save format
(`dense`: plain HF folder; `compressed`: prunekit's sparse format), records:
  * weights bytes (the safetensors files) and folder bytes, against the bound of issue 15
    (unstructured s: (1 - s) dense + 1 bit per weight + 2 %; 2:4: 0.6 dense), where s is the
    fraction of zeros over every stored weight (embeddings, which are never pruned, included);
  * save time; reload time and peak RSS, each reload in a fresh process (best time / highest peak
    of ``--reps`` processes): plain ``transformers`` ``from_pretrained`` for the dense folder, and
    prunekit's block-by-block reader (what ``prunekit.load_model`` calls) for the compressed one;
  * that the reloaded tensors are identical bit for bit (sha256 of every tensor's bytes).

Usage (writes benchmarks/results/scale_sizes.{md,json}):
    flock /tmp/prunekit-heavy.lock python benchmarks/bench_sizes.py
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import write_results

HERE = Path(__file__).resolve().parent
CONFIGS = [("dense", None), ("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None)]
MB = 2**20


def state_hashes(model) -> dict[str, str]:
    """sha256 of the raw bytes of every tensor in the state dict (bit identity, not value equality)."""
    out = {}
    for k, t in model.state_dict().items():
        t = t.detach().contiguous()
        data = t.view(torch.uint8) if t.is_floating_point() else t
        out[k] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return out


def vm_hwm_mb() -> float:
    """This process's peak resident memory (``VmHWM``).

    Not ``ru_maxrss``: Linux carries it across fork + exec, so a child of a parent holding the
    model would report the parent's size.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(folder: str, how: str, dtype: str) -> dict:
    """Runs in a fresh process: load one folder, report time, peak RSS and tensor hashes."""
    import transformers  # noqa: F401 - imported before the baseline, as the load needs it

    import prunekit  # noqa: F401
    from prunekit.formats.compressed_read import load_compressed_model
    from prunekit.models.runtime import resolve_dtype

    def load():
        t = time.perf_counter()
        if how == "transformers":
            m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype))
        else:
            m = load_compressed_model(folder, resolve_dtype(dtype))
        return m, time.perf_counter() - t

    from accelerate import init_empty_weights

    with init_empty_weights():  # import the model class (and its lazy imports) before the baseline
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    base = vm_hwm_mb()
    model, first = load()
    peak = vm_hwm_mb()
    hashes = state_hashes(model)
    del model
    gc.collect()
    _, again = load()  # the first load also pays transformers' lazy imports of the model class
    return {"seconds": first, "seconds_warm": again, "peak_rss_mb": peak, "baseline_rss_mb": base, "hashes": hashes}


def reload(folder: Path, how: str, dtype: str, reps: int) -> list[dict]:
    runs = []
    for _ in range(reps):
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps([str(folder), how, dtype])],
                              capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"reload of {folder} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(line[0][7:]))
    return runs


def zero_stats(model) -> dict:
    from prunekit.models import decoder_linears, weight_view

    lin = [weight_view(m) for m in decoder_linears(model).values()]
    seen, numel, zeros = set(), 0, 0
    for t in model.state_dict().values():
        if t.is_floating_point() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            numel, zeros = numel + t.numel(), zeros + int((t == 0).sum())
    return {"sparsity_linears": sum(int((w == 0).sum()) for w in lin) / sum(w.numel() for w in lin),
            "sparsity_all": zeros / numel, "weights": numel}


def linear_bytes(model, manifest: dict | None) -> tuple[int, int, int]:
    """(stored bytes, dense bytes, weights) of the decoder linears alone (the part pruning touches)."""
    from prunekit.models import decoder_linears

    names = {f"{n}.weight": m.weight for n, m in decoder_linears(model).items()}
    dense = sum(w.numel() * w.element_size() for w in names.values())
    stored = sum(manifest["tensors"][n]["bytes"] for n in names) if manifest else dense
    return stored, dense, sum(w.numel() for w in names.values())


def run_config(model, tok, pattern, sparsity, dtype, tmp: Path, dense_ref: int | None, reps: int) -> list[dict]:
    import prunekit
    from prunekit.formats import save_folder
    from prunekit.formats.compressed_read import read_manifest
    from prunekit.formats.sizes import folder_bytes, weights_bytes

    if pattern != "dense":
        prunekit.prune(model, prunekit.PruneConfig(method="magnitude", sparsity=sparsity, pattern=pattern))
    hashes, stats = state_hashes(model), zero_stats(model)
    rows = []
    for fmt in ("dense", "compressed"):
        out = tmp / f"{pattern.replace(':', '-')}-{sparsity}-{fmt}"
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        save_folder(model, tok, out, save_format=fmt)
        save_s = time.perf_counter() - t
        runs = reload(out, "transformers" if fmt == "dense" else "prunekit", dtype, reps)
        row = {"dtype": dtype, "pattern": pattern, "sparsity": sparsity, "format": fmt, **stats,
               "weights_bytes": weights_bytes(out), "folder_bytes": folder_bytes(out), "save_s": save_s,
               "reload_s": min(r["seconds"] for r in runs), "reload_s_all": [r["seconds"] for r in runs],
               "reload_warm_s": min(r["seconds_warm"] for r in runs),
               "reload_peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
               "baseline_rss_mb": max(r["baseline_rss_mb"] for r in runs),
               "identical": all(r["hashes"] == hashes for r in runs),
               "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
        manifest = read_manifest(out) if fmt == "compressed" else None
        if manifest:
            row["encodings"] = manifest["sizes"]["encodings"]
        row["linear_stored_bytes"], row["linear_dense_bytes"], row["linear_weights"] = linear_bytes(model, manifest)
        rows.append(row)
        shutil.rmtree(out)
    dense = dense_ref or rows[0]["weights_bytes"]
    for row in rows:
        s = row["sparsity_all"]
        row["dense_weights_bytes"] = dense
        row["bound_bytes"] = 0.6 * dense if pattern == "2:4" else (1 - s) * dense + row["weights"] / 8 + 0.02 * dense
        row["within_bound"] = row["weights_bytes"] <= row["bound_bytes"]
        ld, sl = row["linear_dense_bytes"], row["sparsity_linears"]  # the same bound on the pruned linears alone
        n_lin = row["linear_weights"]
        row["linear_bound_bytes"] = 0.6 * ld if pattern == "2:4" else (1 - sl) * ld + n_lin / 8 + 0.02 * ld
        row["linear_within_bound"] = row["linear_stored_bytes"] <= row["linear_bound_bytes"]
        print(json.dumps({k: v for k, v in row.items() if k != "reload_s_all"}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=2, help="reload processes per folder (best time, highest peak)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale_sizes"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*json.loads(args.child))))
        return
    import prunekit
    from prunekit.formats import model_bytes
    from prunekit.report import environment

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sizes-") as tmp:
        for dtype in args.dtypes.split(","):
            model, tok = prunekit.load_model("smollm2-135m", dtype=dtype)
            original = {k: v.clone() for k, v in model.state_dict().items()}
            dense_ref = None
            for pattern, sparsity in CONFIGS:
                model.load_state_dict(original)
                new = run_config(model, tok, pattern, sparsity, dtype, Path(tmp), dense_ref, args.reps)
                dense_ref = dense_ref or new[0]["weights_bytes"]
                for r in new:
                    r["model_bytes"] = model_bytes(model)
                rows += new
            del model, original
    cmd = "flock /tmp/prunekit-heavy.lock python benchmarks/bench_sizes.py " + " ".join(sys.argv[1:])
    result = {"environment": environment(), "model": "smollm2-135m (GGUF Q4_1 dequantized to fp32, cast on load)",
              "criterion": "magnitude", "reps": args.reps, "command": cmd.strip(), "rows": rows}
    write_results(args.out, result, render, indent=2)
    print(render(result))


def _pruned(r: dict) -> str:
    if r["pattern"] == "dense":
        return "none"
    return f"{r['sparsity']:.0%}" if r["pattern"] == "unstructured" else r["pattern"]


def render(res: dict) -> str:
    env, rows = res["environment"], res["rows"]
    mb = {r["dtype"]: r["model_bytes"] / MB for r in rows}
    lines = [
        "## Checkpoint sizes (issue 15, part 2): dense vs compressed save format", "",
        f"SmolLM2-135M ({res['model']}), pruned with {res['criterion']}: a folder's size depends only on how "
        "many weights are zero and where (a count per matrix, or N of every M), not on the criterion that chose "
        f"them. Machine: {env['processor']}, {env['threads']} torch threads; torch {env['torch']}, transformers "
        f"{env['transformers']}, prunekit {env['prunekit']}, Python {env['python']}. Command: `{res['command']}`.", "",
        "*weights* = the folder's safetensors files. *bound* = issue 15's: unstructured (and 4:8) "
        "(1 − s)·dense + 1 bit per weight + 2 %, 2:4 0.6·dense — over the whole folder (s = zeros among every "
        "stored weight, the never-pruned embeddings included; the linears' own sparsity in brackets), and "
        "the same bound over the pruned decoder linears alone (their stored bytes from the manifest).", "",
        "| dtype | pruned | s all (linears) | format | weights MB | ÷ dense | bound MB | ≤ bound | linears ÷ dense "
        "| linears ≤ bound | encodings dense/bitmask/nm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        enc = r.get("encodings")
        lines.append(
            f"| {r['dtype']} | {_pruned(r)} | {r['sparsity_all']:.3f} ({r['sparsity_linears']:.3f}) | {r['format']} | "
            f"{r['weights_bytes'] / MB:.1f} | {r['weights_bytes'] / r['dense_weights_bytes']:.3f} | "
            f"{r['bound_bytes'] / MB:.1f} | {'yes' if r['within_bound'] else 'NO'} | "
            f"{r['linear_stored_bytes'] / r['linear_dense_bytes']:.3f} | "
            f"{'yes' if r['linear_within_bound'] else 'NO'} | "
            f"{'/'.join(str(enc[k]) for k in ('dense', 'bitmask', 'nm')) if enc else '-'} |")
    lines += [
        "", "Save and reload. Each reload runs in a fresh process (best time of "
        f"{res['reps']} processes, highest peak): dense folders with plain `transformers` `from_pretrained`, "
        "compressed ones with prunekit's block-by-block reader (`load_compressed_model`, what "
        "`prunekit.load_model` calls). "
        "Before timing, the process imports torch, transformers and prunekit and builds the architecture once on "
        "the meta device (so lazy imports are not timed); *first* is then the first load, *warm* a second one in "
        "the same process. *peak RSS* is the process's `VmHWM` after the first load, *Δ* its rise over the peak "
        "before it. *load*: the 1-minute load average before/after the row (2 cores: above 2, other work shared "
        "the CPU and times are inflated). *identical*: the sha256 of "
        "every reloaded tensor's bytes equals the saved model's. In-memory size of the model's tensors: "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in mb.items()) + ".", "",
        "| dtype | pruned | format | save s | reload s first (warm) | peak RSS MB | Δ RSS MB | identical | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {_pruned(r)} | {r['format']} | {r['save_s']:.1f} | {r['reload_s']:.2f} "
            f"({r['reload_warm_s']:.2f}) | {r['reload_peak_rss_mb']:.0f} | "
            f"{r['reload_peak_rss_mb'] - r['baseline_rss_mb']:.0f} | {'yes' if r['identical'] else 'NO'} | "
            f"{'/'.join(map(str, r['loadavg_1min']))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
