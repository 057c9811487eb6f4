"""The real SmolLM2-135M: CLI prune with WeLore (two blocks), factorized save and reload; Wanda + DSnoT on one block."""

import json

import pytest
import torch

from prunekit.cli import main
from prunekit.formats import REPORT_FILE
from prunekit.formats import load_model
from prunekit.models.lowrank import LowRankLinear, lowrank_modules

pytestmark = pytest.mark.integration


def test_cli_welore_save_reload(tmp_path, capsys, data_dir, smollm2):
    out = tmp_path / "welore"
    rc = main(["prune", "smollm2-135m", "--method", "welore", "--sparsity", "0.5", "--include", r"layers\.(0|1)\.",
               "--eval", "--out", str(out)])
    assert rc == 0 and "prunekit.load_model" in capsys.readouterr().out
    report = json.loads((out / REPORT_FILE).read_text())
    assert len(report["layers"]) == 14 and report["extra"]["method_summary"]["rank_reduction"] >= 0.5
    model, tok = load_model(str(out))
    mods = lowrank_modules(model)
    assert mods and all(isinstance(m, LowRankLinear) for m in mods.values())
    assert all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in mods)
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.inference_mode():
        base = smollm2[0](ids).logits
        assert torch.isfinite(model(ids).logits).all() and not torch.equal(model(ids).logits, base)


def test_cli_wanda_dsnot(data_dir, smollm2, capsys, tmp_path):
    js = tmp_path / "r.json"
    rc = main(["prune", "smollm2-135m", "--method", "wanda", "--sparsity", "0.6", "--refine", "dsnot",
               "--refine-option", "skip=", "--include", r"layers\.0\.", "--nsamples", "2", "--seqlen", "64",
               "--eval", "--json", str(js)])
    assert rc == 0
    layers = json.loads(js.read_text())["layers"]
    assert all(r["info"]["refine"]["swaps"] > 0 for r in layers)
    assert all(r["sparsity"] == pytest.approx(0.6, abs=2e-3) for r in layers)
