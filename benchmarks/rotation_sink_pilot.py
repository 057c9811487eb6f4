"""Pilot: is it the first tokens that make the rotated thresholds cost more when every token is thresholded?

SmolLM2-135M fp32, TEAL 40 % uniform with and without ``--act-rotate pca`` (the rows of
bench_sparse_decode.py's quality stage, read from its cache: run that stage first), WikiText-2 test first
WINDOWS windows of 1024; the first K tokens of each window prefilled densely, the rest thresholded and scored.
K = 512 is TEAL's protocol, K = 0 every token; a small K keeps only the first tokens dense.

    PRUNEKIT_DATA=../shared/data python benchmarks/rotation_sink_pilot.py [WINDOWS] [K,K,...]
"""

from __future__ import annotations

import argparse
import sys

import prunekit
from prunekit.eval import perplexity
from sparse_decode_rows import build

ROWS = ("dense", "act/teal/uniform/0.4", "act/teal/uniform/0.4/pca")


def main() -> None:
    windows = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    ks = [int(k) for k in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 8]
    args = argparse.Namespace(recalibrate=False, nsamples=16)
    print(f"SmolLM2-135M fp32, WikiText-2 first {windows} windows of 1024, first K tokens dense", flush=True)
    for label in ROWS:
        if label == "dense":
            model, tok = prunekit.load_model("smollm2-135m", "float32")
        else:
            model, tok = build(label, "smollm2-135m", "float32", args)
        cells = []
        for k in ks:
            r = perplexity(model, tok, "wikitext2", 1024, windows, 1, prompt=k)
            cells.append(f"K={k}: {r.ppl:.2f}")
        print(f"{label:28s} " + " | ".join(cells), flush=True)
        del model


if __name__ == "__main__":
    main()
