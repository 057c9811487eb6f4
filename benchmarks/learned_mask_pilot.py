"""Pilot: does reconstruct's mask=learned lower the block error that the fixed-mask fit leaves? (issue 30)

SmolLM2-135M fp32, SparseGPT 70 % on the first BLOCKS decoder blocks only, Austen calibration N x 1024
(seed 0), the last 4 sequences held out of every block fit (``holdout=4``): each variant's report gives the
held-out block MSE before / after the fit and the share of kept weights the learned mask moved.
A fit that raises the held-out MSE is undone (holdout's rule) — the report says so.

    PRUNEKIT_DATA=../shared/data python benchmarks/learned_mask_pilot.py [BLOCKS] [N] [VARIANT,VARIANT...]
"""

from __future__ import annotations

import sys
import time

import torch

import prunekit
from prunekit import PruneConfig
from prunekit.data import CalibConfig, calibration_ids

VARIANTS = {
    "fixed lr3e-4": {},
    "learned lr3e-4": {"mask": "learned"},
    "learned lr1e-3": {"mask": "learned", "lr": 1e-3},
    "fixed lr1e-3": {"lr": 1e-3},
    "learned lr1e-3 decay2e-4": {"mask": "learned", "lr": 1e-3, "mask_decay": 2e-4},
}


def main() -> None:
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    chosen = sys.argv[3].split(",") if len(sys.argv) > 3 else list(VARIANTS)
    torch.manual_seed(0)
    _, tok = prunekit.load_model("smollm2-135m", "float32")
    ids = calibration_ids(CalibConfig("austen", n, 1024, 0), tok)
    include = (rf"model\.layers\.({'|'.join(str(i) for i in range(blocks))})\.",)
    print(f"SmolLM2-135M fp32, sparsegpt 70 %, blocks 0-{blocks - 1}, calib austen {n}x1024, holdout 4, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for label in chosen:
        opts = VARIANTS[label]
        model, _ = prunekit.load_model("smollm2-135m", "float32")
        cfg = PruneConfig(method="sparsegpt", sparsity=0.7, include=include, refine="reconstruct",
                          refine_options={**opts, "holdout": 4, "amp": "none"},
                          calib={"dataset": "austen", "nsamples": n, "seqlen": 1024, "batch_size": 4, "seed": 0})
        t0 = time.perf_counter()
        rep = prunekit.prune(model, cfg, calib=ids)
        cells = [f"{b.info['heldout_before']:.4f}->{b.info['heldout_after']:.4f}"
                 f"{' (undone)' if b.info.get('reverted') else ''} moved {b.info.get('mask_changed', 0.0):.3f}"
                 for b in rep.blocks if b.info.get("steps")]
        print(f"{label:26s} {time.perf_counter() - t0:6.0f}s  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
