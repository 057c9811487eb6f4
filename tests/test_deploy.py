"""Deployable shapes by default: structured pruning's width multiple (``--width-multiple``, auto = 256 where
it divides the FFN widths), and the real SmolLM2 through llama.cpp (integration; skipped unless built)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import rand_ids, tiny_model
from prunekit import PruneConfig, prune
from prunekit.formats import llamacpp
from prunekit.models.structure import block_parts
from prunekit.structured.plan import KQUANT_MULTIPLE, UnitCosts, resolve_multiple


def _ids(n=4, seqlen=32):
    return rand_ids(n, seqlen)


def test_auto_multiple_is_256_only_where_it_divides_every_ffn_width():
    m512, m128 = tiny_model(intermediate_size=512), tiny_model()
    costs = lambda m: [UnitCosts(b.index, None, b.ffn, 0) for b in block_parts(m)]  # noqa: E731
    assert resolve_multiple(0, costs(m512)) == KQUANT_MULTIPLE == 256
    assert resolve_multiple(0, costs(m128)) == 32
    assert resolve_multiple(64, costs(m512)) == 64


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_default_pruning_keeps_ffn_widths_on_k_quant_blocks(allocation):
    model = tiny_model(intermediate_size=1024, num_hidden_layers=3)
    rep = prune(model, PruneConfig(method="wanda", pattern="channels", sparsity=0.3, allocation=allocation),
                calib=_ids())
    widths = [b.ffn.width for b in block_parts(model)]
    assert rep.extra["structure"]["plan"]["multiple"] == 256
    assert all(w % 256 == 0 for w in widths) and sum(widths) < 3 * 1024


def test_width_multiple_flag_reaches_the_plan_and_is_refused_where_meaningless(tmp_path, capsys):
    from conftest import save_tiny
    from prunekit.cli import main

    folder = save_tiny(tmp_path / "m", intermediate_size=512)
    out = tmp_path / "p"
    rc = main(["prune", str(folder), "--method", "wanda", "--pattern", "channels", "--sparsity", "0.3",
               "--width-multiple", "32", "--calib", str(_corpus(tmp_path)), "--nsamples", "2", "--seqlen", "16",
               "--eval", "--no-dense-eval", "--out", str(out)])
    assert rc == 0
    import json

    report = json.loads((out / "prunekit_report.json").read_text())
    assert report["extra"]["structure"]["plan"]["multiple"] == 32
    capsys.readouterr()
    rc = main(["prune", str(folder), "--pattern", "blocks", "--sparsity", "0.3", "--width-multiple", "256",
               "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "--width-multiple applies to --pattern channels" in err


def _corpus(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return f


@pytest.mark.integration
@pytest.mark.skipif(not llamacpp.available(), reason="llama.cpp not built (python benchmarks/llamacpp.py build)")
def test_smollm2_in_llamacpp_gives_prunekits_logits(smollm2, tmp_path, data_dir):
    """The real model, f32: top-1 next token equal at >= 99 % of 512 WikiText-2 positions."""
    from prunekit.eval.perplexity import eval_token_ids
    from prunekit.formats.gguf import GGUFOptions, export_gguf

    model, tok = smollm2
    ids = eval_token_ids(tok, "wikitext2", 512)[:512]
    export_gguf(model, tok, tmp_path / "m.gguf", GGUFOptions("f32"))
    with torch.no_grad():
        ref = model(ids[None]).logits[0].numpy()
    got = llamacpp.logits(tmp_path / "m.gguf", ids.numpy())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99
    assert np.abs(got - ref).max() < 0.1
