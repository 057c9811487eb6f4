"""Pilot: does distillation with TEAL's thresholds in place close 40 % activation sparsity's perplexity gap?

SmolLM2-135M fp32; TEAL 40 % uniform calibrated on Austen 16 x 1024 (seed 0); then ``prunekit.recover`` (full,
KL to the dense model, Austen, TOKENS tokens, lr LR, 8 windows per step) with the thresholds in the forward
pass; WikiText-2 test (WINDOWS windows of 1024, TEAL's protocol: first 512 tokens a dense prompt, the next 512
thresholded and scored) and GSM8K test (8 windows, same protocol) before, after (thresholds as trained with),
after re-calibration, and the trained model without thresholds.

    PRUNEKIT_DATA=../shared/data python benchmarks/act_recover_pilot.py THREADS TOKENS LR WINDOWS
    (docs/activation_sparsity.md: 1 65536 1e-4 20)
"""

import copy
import sys
import time

import torch

import prunekit
from prunekit import ActivationSparsityConfig, CalibConfig
from prunekit.data import calibration_ids
from prunekit.eval import perplexity
from prunekit.models.activation import state_of
from prunekit.recover import RecoverConfig, recover


def main(threads: int, tokens: int, lr: float, windows: int) -> None:
    torch.set_num_threads(threads)
    t = time.time()
    model, tok = prunekit.load_model("smollm2-135m", "float32")
    teacher = copy.deepcopy(model)
    cfg = ActivationSparsityConfig(sparsity=0.4, calib=CalibConfig("austen", 16, 1024, 0))
    ids = calibration_ids(cfg.calib, tok)

    def ppl(tag):
        r = perplexity(model, tok, "wikitext2", 1024, windows, 1, prompt=512)
        g = perplexity(model, tok, "gsm8k", 1024, 8, 1, prompt=512)
        print(f"{tag}: wt2 {r.ppl:.3f} gsm8k {g.ppl:.3f} [{time.time() - t:.0f}s]", flush=True)

    st = prunekit.sparsify_activations(model, cfg, calib=ids)
    print("skipped", st.report["skipped_fraction"], flush=True)
    ppl("teal40 before")
    rc = RecoverConfig(data="austen", tokens=tokens, seqlen=1024, grad_accum=8, lr=lr, val_windows=4,
                       act_keep_thresholds=True)
    rep = recover(model, teacher, tok, rc, callback=lambda s: print(" step", s.step, round(s.loss, 4), flush=True))
    print("val", rep.validation_before, rep.validation_after, "s", round(rep.seconds), "activation", rep.activation,
          flush=True)
    ppl("teal40 trained, same thresholds")
    st2 = prunekit.sparsify_activations(model, cfg, calib=ids)
    print("skipped", st2.report["skipped_fraction"], flush=True)
    ppl("teal40 trained, recalibrated")
    state_of(model).remove()
    del model.prunekit_activation
    ppl("trained, no thresholds")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
