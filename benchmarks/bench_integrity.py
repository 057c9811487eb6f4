"""What checking the checksums costs when a saved folder loads (SmolLM2-135M, issue 27 fix 1).

Saves SmolLM2-135M (fp32) pruned to 50 % (magnitude: the folder's size depends on how many weights
are zero, not which) in the compressed format, and factorized to 50 % rank (WeLore, no calibration)
in the low-rank format. Then loads each folder ``--reps`` times with the checksums checked and
``--reps`` times with the check switched off (the same reader; ``check_tensor`` replaced by a no-op),
interleaved in one process so both see the same page cache, and reports the median and spread of
each and the overhead. Also measures CRC-32, BLAKE2b and SHA-256 on the bytes of one folder (the
reason for CRC-32). Writes benchmarks/results/integrity.{json,md}.

Usage (2 threads, under the machine lock):
    /work/bin/heavy --tag integrity python benchmarks/bench_integrity.py --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import zlib
from pathlib import Path

import torch

from common import save_json, seconds

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _folders(tmp: Path) -> dict[str, Path]:
    from prunekit import PruneConfig, load_model, prune
    from prunekit.calibration import run_sequential
    from prunekit.formats import save_folder
    from prunekit.formats.lowrank import save_lowrank
    from prunekit.methods import Target, build_method
    from prunekit.models import decoder_linears

    model, tok = load_model("smollm2-135m")
    prune(model, PruneConfig(method="magnitude", sparsity=0.5))
    compressed, _ = save_folder(model, tok, tmp / "compressed", save_format="compressed")
    model, tok = load_model("smollm2-135m")
    run_sequential(model, None, build_method("welore"), {n: Target(0.5) for n in decoder_linears(model)})
    lowrank = save_lowrank(model, tok, tmp / "lowrank")
    return {"compressed (magnitude 50 %)": compressed, "low-rank (WeLore 50 %)": lowrank}


def _load_times(folder: Path, reps: int) -> dict[str, list[float]]:
    from prunekit.formats import checksum
    from prunekit.formats.compressed_read import is_compressed_folder, load_compressed_model
    from prunekit.formats.lowrank import load_lowrank_model

    from safetensors.torch import load_file

    compressed = is_compressed_folder(folder)
    loader = load_compressed_model if compressed else load_lowrank_model
    real_check, real_read = checksum.check_tensor, checksum.read_verified
    # the compressed reader is unchanged but for the check; the low-rank one read with load_file before
    modes = ("checked", "unchecked") if compressed else ("checked", "unchecked", "before (load_file)")
    out: dict[str, list[float]] = {m: [] for m in modes}
    loader(folder, torch.float32)  # warm the page cache and the imports
    for _ in range(reps):
        for mode in modes:
            if mode != "checked":
                checksum.check_tensor = lambda *a, **k: None
            if mode.startswith("before"):
                checksum.read_verified = lambda path, sums: load_file(str(path))
            try:
                out[mode].append(seconds(lambda: loader(folder, torch.float32)))
            finally:
                checksum.check_tensor, checksum.read_verified = real_check, real_read
    return out


def _hash_speeds(folder: Path) -> dict[str, float]:
    data = b"".join(f.read_bytes() for f in sorted(folder.glob("*.safetensors")))
    fns = {"crc32 (zlib)": zlib.crc32, "blake2b": lambda b: hashlib.blake2b(b).digest(),
           "sha256": lambda b: hashlib.sha256(b).digest()}
    return {name: len(data) / 2**20 / min(seconds(lambda: fn(data)) for _ in range(3)) for name, fn in fns.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE.parent / "src"))
    from prunekit.report import environment

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = _folders(Path(tmp))
        speeds = _hash_speeds(folders["compressed (magnitude 50 %)"])
        for name, folder in folders.items():
            t = _load_times(folder, args.reps)
            mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
            c, u = statistics.median(t["checked"]), statistics.median(t["unchecked"])
            rows.append({"folder": name, "weights_mb": round(mb, 1), "reps": args.reps,
                         "checked_s": t["checked"], "unchecked_s": t["unchecked"], "checked_median_s": c,
                         "unchecked_median_s": u, "overhead_s": c - u, "overhead_pct": 100 * (c - u) / u,
                         "before_s": t.get("before (load_file)"),
                         "before_median_s": statistics.median(t["before (load_file)"]) if "before (load_file)" in t
                         else u})
    env = environment()
    command = f"python benchmarks/bench_integrity.py --threads {args.threads} --reps {args.reps}"
    save_json(RESULTS / "integrity.json", {"environment": env, "command": command, "rows": rows,
                                           "hash_mb_per_s": speeds}, indent=2)
    lines = ["# Checksum cost when a saved folder loads (SmolLM2-135M, fp32)", "",
             f"Machine: {env['processor']}, {env['threads']} threads; torch {env['torch']}, transformers "
             f"{env['transformers']}. Command: `{command}`. Each load is `prunekit.load_model`'s reader for the "
             "format, in one process, checked and unchecked interleaved (warm page cache).", "",
             "| folder | weights MB | load, checked (median s) | load, unchecked (median s) | overhead of the check |"
             " spread checked (min-max s) | spread unchecked (min-max s) | load before this change (median s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['folder']} | {r['weights_mb']} | {r['checked_median_s']:.3f} | "
                     f"{r['unchecked_median_s']:.3f} | {r['overhead_s'] * 1000:+.0f} ms ({r['overhead_pct']:+.1f} %) "
                     f"| {min(r['checked_s']):.3f}-{max(r['checked_s']):.3f} | "
                     f"{min(r['unchecked_s']):.3f}-{max(r['unchecked_s']):.3f} | {r['before_median_s']:.3f}"
                     f"{' (same reader)' if r['before_s'] is None else ' (safetensors load_file)'} |")
    lines += ["", "Hash throughput on the compressed folder's bytes (best of 3): "
              + ", ".join(f"{k} {v:.0f} MB/s" for k, v in speeds.items()) + "."]
    (RESULTS / "integrity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
