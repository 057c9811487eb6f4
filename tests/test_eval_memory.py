"""Evaluation holds one batch's logits at a time: the previous batch's logits (vocabulary-wide, the
largest tensors of an evaluation) are freed before the next forward runs."""

from __future__ import annotations

import weakref

import torch

from conftest import tiny_model
from prunekit.eval.perplexity import perplexity_of_ids


def test_perplexity_frees_each_batchs_logits_before_the_next_forward():
    model = tiny_model("llama")
    alive = weakref.WeakSet()
    seen = []
    real = model.forward

    def forward(*args, **kwargs):
        seen.append(len(alive))  # logits of earlier batches still referenced somewhere
        out = real(*args, **kwargs)
        alive.add(out.logits)
        return out

    model.forward = forward
    ids = torch.randint(0, 128, (5 * 16,), generator=torch.Generator().manual_seed(0))
    res = perplexity_of_ids(model, ids, seqlen=16, batch_size=1)
    assert res.windows == 5 and seen == [0, 0, 0, 0, 0]
