"""A few recovery steps on the real SmolLM2-135M: masks kept, losses finite, bf16 teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from prunekit import PruneConfig, RecoverConfig, prune, recover
from prunekit.models import decoder_linears
from prunekit.models import cpu_has_bf16

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


def test_smollm2_recovers_a_few_steps_and_keeps_its_zeros(smollm2, data_dir, tmp_path):
    model, tok = smollm2
    student, teacher = copy.deepcopy(model), copy.deepcopy(model)  # the session fixture stays untouched
    prune(student, PruneConfig(method="magnitude", sparsity=0.5, include=(r"layers\.(0|1|29)\.",)))
    zeros = {n: (m.weight == 0).clone() for n, m in decoder_linears(student).items()}
    txt = tmp_path / "emma.txt"
    txt.write_text((data_dir / "austen" / "emma.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    cfg = RecoverConfig(data=str(txt), tokens=2 * 128, seqlen=128, batch_size=1, grad_accum=1, val_windows=1,
                        lr=1e-4, bf16=cpu_has_bf16())
    rep = recover(student, teacher, tok, cfg)
    assert rep.steps == 2 and rep.masks_kept
    assert rep.teacher_dtype == ("bfloat16" if cpu_has_bf16() else "float32")
    assert all(math.isfinite(h["loss"]) for h in rep.history)
    assert rep.validation_before["kl"] > 0 and math.isfinite(rep.validation_after["kl"])
    for n, m in decoder_linears(student).items():
        assert torch.equal(m.weight == 0, zeros[n]), n
    assert rep.sparsity_after == rep.sparsity_before
