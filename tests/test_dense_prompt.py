"""Perplexity with a dense prompt: what generation sees under activation thresholds (TEAL's protocol)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit import ActivationSparsityConfig
from prunekit.errors import ConfigError
from prunekit.eval.perplexity import perplexity_of_ids
from prunekit.kernels import prepare_decode

from conftest import rand_ids, tiny_model


def _cfg(method="teal"):
    return ActivationSparsityConfig(sparsity=0.5, method=method, max_tokens=4096)


def test_prompt_scores_only_the_tokens_after_it():
    model = tiny_model("llama")
    ids = rand_ids(3, 16, seed=1).reshape(-1)
    res = perplexity_of_ids(model, ids, 16, prompt=6)
    with torch.no_grad():
        logits = model(ids.view(3, 16)).logits
    nll = F.cross_entropy(logits[:, 5:-1].reshape(-1, logits.shape[-1]), ids.view(3, 16)[:, 6:].reshape(-1))
    assert res.tokens == 3 * 10 and res.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert perplexity_of_ids(model, ids, 16, prompt=0).tokens == 3 * 15


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_dense_prompt_leaves_the_prompt_dense_and_thresholds_the_rest(method):
    model, ids = tiny_model("qwen2"), rand_ids(4, 24, seed=0)
    seq = rand_ids(1, 20, seed=5)
    with torch.no_grad():
        dense = model(seq).logits
        st = prunekit.sparsify_activations(model, _cfg(method), calib=ids)
        masked = model(seq).logits
        with st.dense_prompt(8):
            mixed = model(seq).logits
        again = model(seq).logits
    assert torch.equal(mixed[:, :8], dense[:, :8])  # causal: the prompt's logits are the dense model's
    assert not torch.allclose(mixed[:, 8:], dense[:, 8:]) and not torch.allclose(mixed[:, 8:], masked[:, 8:])
    assert torch.equal(again, masked)  # leaving the context thresholds every token again


def test_dense_prompt_perplexity_is_what_generation_computes():
    model, ids = tiny_model("qwen2"), rand_ids(4, 24, seed=0)
    st = prunekit.sparsify_activations(model, _cfg(), calib=ids)
    seq, p = rand_ids(1, 14, seed=7), 6
    with torch.inference_mode():
        with st.dense_prompt(p):
            ref = model(seq).logits[0, p - 1:]
        handle = prepare_decode(model)  # the runtime: the prompt prefilled densely, each new token thresholded
        out = model(seq[:, :p], use_cache=True)
        rows = [out.logits[0, -1]]
        for i in range(p, seq.shape[1]):
            out = model(seq[:, i:i + 1], cache=out.cache, use_cache=True)
            rows.append(out.logits[0, -1])
        handle.restore()
    got = torch.stack(rows)  # positions p-1 .. end: the predictions a dense-prompt perplexity scores
    assert (got - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("prompt", [-1, 15, 16, 2.5, True])
def test_prompt_out_of_range_is_one_line(prompt):
    with pytest.raises(ConfigError, match=f"prompt={prompt!r}"):
        perplexity_of_ids(tiny_model("llama"), rand_ids(2, 16, seed=1).reshape(-1), 16, prompt=prompt)
