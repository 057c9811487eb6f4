"""The real embedded SmolLM2-135M on a few hundred tokens: the README's main path."""

import json

import pytest
import torch

from prunekit import EvalConfig, PruneConfig, evaluate, prune
from prunekit.cli import main
from prunekit.formats import REPORT_FILE
from prunekit.models import decoder_linears, weight_view

pytestmark = pytest.mark.integration


def test_dense_perplexity_is_sane(smollm2, data_dir):
    model, tok = smollm2
    res = evaluate(model, tok, EvalConfig(seqlen=256, max_windows=2))["wikitext2"]
    assert res.windows == 2 and res.tokens == 2 * 255 and res.seqlen == 256
    assert 5 < res.ppl < 60


def test_cli_prune_save_reload_with_plain_transformers(tmp_path, capsys, data_dir, smollm2):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2-wanda50"
    rc = main(["prune", "smollm2-135m", "--method", "wanda", "--sparsity", "0.5", "--calib", "austen",
               "--nsamples", "2", "--seqlen", "128", "--eval", "wikitext2", "--max-windows", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "wikitext2 ppl" in printed and "dense" in printed and "pruned" in printed
    report = json.loads((out / REPORT_FILE).read_text())
    dense = report["evaluation"]["dense"]["wikitext2"]["ppl"]
    pruned = report["evaluation"]["pruned"]["wikitext2"]["ppl"]
    assert pruned > dense > 1
    assert report["summary"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert len(report["layers"]) == 30 * 7

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no prunekit
    linears = decoder_linears(model)
    assert len(linears) == 210
    for name, mod in linears.items():
        w = weight_view(mod)
        per_row = (w == 0).sum(1)
        assert (per_row >= w.shape[1] // 2).all(), name  # Wanda: half of every row
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=2e-3), name
    dense_model, _ = smollm2
    assert torch.equal(model.model.embed_tokens.weight, dense_model.model.embed_tokens.weight)  # never pruned


def test_api_three_lines_and_nm(smollm2, data_dir):
    import copy

    model, tok = smollm2
    model = copy.deepcopy(model)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(method="sparsegpt", pattern="2:4", sparsity=None, include=(r"layers\.(0|29)\.",))
    report = prune(model, cfg, calib=ids)
    assert len(report.layers) == 14
    assert report.sparsity == pytest.approx(0.5, abs=1e-4)
    w = weight_view(model.get_submodule("model.layers.29.mlp.down_proj"))
    assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
