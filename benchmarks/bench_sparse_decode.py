"""Sparsity that runs faster on a CPU: quality, kernel speed and end-to-end decode (issue 29).

Four stages, each resumable by row (finished rows are kept in the JSON and skipped):

* ``kernels``: the machine's memory bandwidth (a streaming read, ``torch.sum`` over 1 GiB), then
  the GEMV time of every format at 30/50/70 % sparsity on the decoder shapes of SmolLM2-135M and
  Qwen2.5-Coder-1.5B, fp32 and bf16, next to torch's dense GEMV and the bytes-moved bound
  (bytes read / bandwidth). Weights rotate over enough copies to exceed the L3 cache.
* ``quality``: the masked model in PyTorch (every token thresholded) — WikiText-2 and GSM8K-test
  perplexity (seqlen 1024, first ``--windows`` windows) and PIQA accuracy (first ``--piqa``
  examples, with stderr) — for activation sparsity (TEAL uniform/greedy, CATS, CHESS at
  25/40/50 %), Wanda 50 %, both, and ShortGPT block removal. Thresholds and pruned weights are
  kept under ``$PRUNEKIT_CACHE/bench_sparse_decode`` for the speed stage.
* ``speed``: ``prunekit.kernels.bench.bench_decode`` of each setting — prefill and batch-1 decode
  (KV cache), dense and sparse interleaved in one process, median of ``--repeats`` — fp32 and bf16.
* ``prefill``: prefill alone at several prompt lengths (``--prefill-lengths``), dense and sparse
  interleaved at each: how the fixed per-pass cost of unpacking the weights amortises.

Every timing runs under the machine-wide lock, 2 threads::

    /work/bin/heavy --tag actsparse python benchmarks/bench_sparse_decode.py kernels
    /work/bin/heavy --tag actsparse python benchmarks/bench_sparse_decode.py quality --model smollm2-135m
    /work/bin/heavy --tag actsparse python benchmarks/bench_sparse_decode.py speed --model smollm2-135m

Writes ``benchmarks/results/sparse_decode.json``; ``sparse_decode_render.py`` writes the ``.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUT = Path(os.environ.get("SPARSE_DECODE_JSON", RESULTS / "sparse_decode.json"))  # tests of the script write elsewhere
os.environ.setdefault("PRUNEKIT_DATA", str(HERE.parents[1] / "shared" / "data"))
sys.path.insert(0, str(HERE))

import prunekit  # noqa: E402, F401  (registers the kernels and aliases)
from common import load_json, median_time, save_json  # noqa: E402
from prunekit.kernels import ops  # noqa: E402
from prunekit.formats.sources import cache_root  # noqa: E402
from prunekit.report import environment  # noqa: E402

SHAPES = {"smollm2-135m": [(576, 1536), (1536, 576)], "qwen2.5-coder-1.5b": [(1536, 8960), (8960, 1536)]}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CACHE = cache_root() / "bench_sparse_decode"


def load() -> dict:
    return load_json(OUT, {"runs": [], "kernels": {}, "quality": {}, "speed": {}})


def save(data: dict) -> None:
    from sparse_decode_render import render

    save_json(OUT, data)  # OUT may be any name (SPARSE_DECODE_JSON); the table goes beside it
    OUT.with_suffix(".md").write_text(render(data))


def bandwidth() -> dict:
    """GB/s of a streaming read: ``sum`` over a 1 GiB float32 buffer (2 threads), median of 7."""
    buf = torch.ones(2**28)
    t = median_time(lambda: buf.sum(), 7)
    return {"gb_s": buf.numel() * 4 / t["median"] / 1e9, "gb_s_best": buf.numel() * 4 / t["min"] / 1e9,
            "buffer_bytes": buf.numel() * 4, "how": "torch.sum over a 1 GiB float32 tensor, median of 7"}


def _rotating(make, nbytes: int):
    """Enough copies of a weight to exceed a 32 MB L3 three times, used in turn."""
    n = max(2, -(-96 * 2**20 // max(nbytes, 1)))
    copies = [make() for _ in range(n)]
    state = {"i": 0}

    def nxt():
        state["i"] = (state["i"] + 1) % n
        return copies[state["i"]]

    return nxt


def kernel_rows(in_f: int, out_f: int, dtype: torch.dtype, bw: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(in_f, generator=g).to(dtype)
    isz = w.element_size()
    dense_bytes = w.numel() * isz
    rows = []

    def add(fmt, sparsity, kind, nbytes, fn):
        t = median_time(fn)
        rows.append({"shape": f"{in_f}->{out_f}", "dtype": str(dtype).split(".")[-1], "format": fmt, "kind": kind,
                     "sparsity": sparsity, "bytes": nbytes, "ms": 1e3 * t["median"], "ms_min": 1e3 * t["min"],
                     "ms_max": 1e3 * t["max"], "bound_ms": 1e3 * nbytes / (bw * 1e9)})

    ws = _rotating(lambda: w.clone(), dense_bytes)
    add("torch F.linear (W)", 0.0, "dense", dense_bytes, lambda: torch.nn.functional.linear(x[None], ws()))
    wts = _rotating(lambda: w.t().contiguous(), dense_bytes)
    add("torch x @ W^T", 0.0, "dense", dense_bytes, lambda: x[None] @ wts())
    add("gemv_t (W^T), no threshold", 0.0, "dense", dense_bytes, lambda: ops.gemv_t(x, wts(), None))
    for s in (0.3, 0.5, 0.7):
        thr = float(x.float().abs().quantile(s))
        add("gemv_t (W^T)", s, "activation", int(dense_bytes * (1 - s)), lambda: ops.gemv_t(x, wts(), thr))
    for s in (0.3, 0.5, 0.7):
        ws_ = w.clone()
        ws_[torch.rand(w.shape, generator=g) < s] = 0
        bm = _rotating(lambda: ops.pack_bitmask(ws_.t().contiguous()), dense_bytes)
        csr = _rotating(lambda: ops.pack_csr16(ws_), dense_bytes)
        add("bitmask W^T", s, "weight", bm().nbytes, lambda: ops.gemv_bitmask(x, bm()))
        add("CSR, 16-bit columns", s, "weight", csr().nbytes, lambda: ops.gemv_csr16(x, csr()))
        if s == 0.5:
            thr = float(x.float().abs().quantile(0.4))
            add("bitmask W^T + activation 40 %", s, "both", int(bm().nbytes * 0.6),
                lambda: ops.gemv_bitmask(x, bm(), thr))
    return rows


def stage_kernels(args, data: dict) -> None:
    bw = bandwidth()
    print(f"streaming read: {bw['gb_s']:.1f} GB/s")
    data["kernels"] = {"bandwidth": bw, "rows": [], "environment": environment(), "isa": ops.extension().get_isa()
                       if ops.extension() else None}
    for model, shapes in SHAPES.items():
        for name, dt in DTYPES.items():
            for in_f, out_f in shapes:
                rows = kernel_rows(in_f, out_f, dt, bw["gb_s"])
                for r in rows:
                    r["model"] = model
                    print(f"{model} {name} {r['shape']} {r['format']:32s} s={r['sparsity']:.1f} {r['ms']:.3f} ms "
                          f"(bound {r['bound_ms']:.3f})")
                data["kernels"]["rows"] += rows
                save(data)


if __name__ == "__main__":
    from sparse_decode_rows import stage_prefill, stage_quality, stage_speed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["kernels", "quality", "speed", "prefill", "render"])
    p.add_argument("--model", default="smollm2-135m", choices=list(SHAPES))
    p.add_argument("--rows", nargs="*", default=None, help="only these row labels (default: the stage's grid)")
    p.add_argument("--redo", action="store_true", help="measure rows again even if present")
    p.add_argument("--recalibrate", action="store_true",
                   help="calibrate activation thresholds again instead of reading the cached ones")
    p.add_argument("--windows", type=int, default=20, help="perplexity windows of 1024 tokens (default 20)")
    p.add_argument("--piqa", type=int, default=500, help="PIQA examples (0: skip; default 500)")
    p.add_argument("--add-tasks", action="store_true",
                   help="quality: add PIQA to rows measured without it (their perplexities are kept)")
    p.add_argument("--dense-prompt", action="store_true",
                   help="quality: also WikiText-2 as generation sees it (TEAL's protocol: each window's first 512 "
                        "tokens a dense prompt, the next 512 thresholded and scored); added to measured rows too")
    p.add_argument("--quality-dtype", default=None, choices=list(DTYPES),
                   help="quality: measure in this dtype (default bfloat16; other dtypes get their own table)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences of 1024 tokens (default 16)")
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=[128, 512, 1024],
                   help="prompt lengths of the prefill stage (default 128 512 1024)")
    p.add_argument("--note", default="", help="a note for this run's entry")
    a = p.parse_args()
    torch.set_num_threads(2)
    d = load()
    if a.stage == "render":  # re-render the Markdown only
        save(d)
        sys.exit(0)
    d["runs"].append({"command": "python benchmarks/bench_sparse_decode.py " + shlex.join(sys.argv[1:]),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S"), "environment": environment(),
                      "load": os.getloadavg()[0], "note": a.note})
    {"kernels": stage_kernels, "quality": stage_quality, "speed": stage_speed, "prefill": stage_prefill,
     "render": lambda args, data: None}[a.stage](a, d)
    save(d)
