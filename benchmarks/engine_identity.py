"""Weight fingerprints of every method on SmolLM2-135M, to prove an engine change moved nothing.

Prunes the embedded SmolLM2-135M with each configuration below (small calibration: the point is
identity, not quality) and prints one SHA-256 per configuration over every decoder linear's
weights (and low-rank factors) plus the WikiText-2 perplexity of the first windows. Run it with
the old code and the new code and compare the JSON files:

    PRUNEKIT_DATA=../shared/data PYTHONPATH=<old checkout>/src python benchmarks/engine_identity.py --out old.json
    PRUNEKIT_DATA=../shared/data python benchmarks/engine_identity.py --out new.json --compare old.json

Only the public API is used (``prune(model, PruneConfig(...), tokenizer=...)``), so the script
runs unchanged on both sides of an engine refactor.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time

import torch

CONFIGS = [
    dict(method="magnitude", sparsity=0.5),
    dict(method="magnitude", pattern="2:4", sparsity=None),
    dict(method="wanda", sparsity=0.5),
    dict(method="wanda", pattern="2:4", sparsity=None),
    dict(method="sparsegpt", sparsity=0.5),
    dict(method="sparsegpt", pattern="2:4", sparsity=None),
    dict(method="wanda", sparsity=0.6, allocation="owl"),
    dict(method="wanda", sparsity=0.6, allocation="alpha"),
    dict(method="sparsegpt", sparsity=0.6, pattern="4:8", allocation="alpha"),
    dict(method="wanda", sparsity=0.6, refine="dsnot"),
    dict(method="magnitude", sparsity=0.6, refine="dsnot", refine_options={"skip": ""}),
    dict(method="svd", sparsity=0.3),
    dict(method="welore", sparsity=0.3),
    dict(method="svd-llm", sparsity=0.3),
]


def fingerprint(model, values: bool = False) -> str:
    """SHA-256 over every decoder tensor's bytes; ``values``: with -0.0 written as +0.0 first (the two are
    equal numbers, but a pruned negative weight multiplied by a zero mask is -0.0, a filled one +0.0)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if ".layers." in name:
            t = t.detach()
            if values and t.is_floating_point():
                t = t + 0.0  # IEEE: -0.0 + 0.0 = +0.0; every other value unchanged
            h.update(name.encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None, help="JSON of an earlier run: exit 1 unless every hash matches")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    import prunekit
    from prunekit import CalibConfig, EvalConfig, PruneConfig

    torch.set_num_threads(2)
    base, tok = prunekit.load_model("smollm2-135m")
    calib = CalibConfig(dataset="austen", nsamples=args.nsamples, seqlen=args.seqlen, batch_size=4)
    rows = {}
    for cfg in CONFIGS:
        key = json.dumps(cfg, sort_keys=True)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        prunekit.prune(model, PruneConfig(**cfg, calib=calib), tokenizer=tok)
        secs = time.perf_counter() - t0
        ppl = prunekit.evaluate(model, tok, EvalConfig(seqlen=512, max_windows=args.windows))["wikitext2"].ppl
        rows[key] = {"sha256": fingerprint(model), "sha256_values": fingerprint(model, values=True), "ppl": ppl,
                     "seconds": secs}
        print(f"{key}: {rows[key]['sha256'][:16]} ppl {ppl:.4f} ({secs:.1f}s)", flush=True)
        del model
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    if args.compare:
        old = json.load(open(args.compare))
        missing = [k for k in rows if k not in old]
        bits = [k for k in rows if k in old and old[k]["sha256"] != rows[k]["sha256"]]
        key = "sha256_values" if all("sha256_values" in old[k] for k in rows if k in old) else "sha256"
        bad = [k for k in rows if k in old and old[k][key] != rows[k][key]]
        print(f"{len(rows) - len(bits) - len(missing)} bit-identical, {len(bits) - len(bad)} equal in value (only "
              f"the sign of zeros differs), {len(bad)} differ, {len(missing)} not in {args.compare}")
        for k in bad:
            print(f"  DIFFERS: {k}: ppl {old[k]['ppl']:.4f} -> {rows[k]['ppl']:.4f}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
