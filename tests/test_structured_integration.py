"""The real SmolLM2-135M: structured width pruning saves a plain folder that stock transformers loads
(in a process without prunekit) with the same logits; block removal keeps a consistent config."""

import json

import pytest
import torch

from test_structured_save import _plain_diff
from prunekit import CalibConfig, PruneConfig, load_model, prune
from prunekit.formats import save_compressed

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("pattern,method", [("width", "flap"), ("blocks", "shortgpt")])
def test_smollm2_structured_plain_folder(tmp_path, data_dir, pattern, method):
    model, tok = load_model("smollm2-135m")
    report = prune(model, PruneConfig(method=method, pattern=pattern, sparsity=0.25,
                                      calib=CalibConfig(nsamples=2, seqlen=64)), tokenizer=tok)
    st = report.extra["structure"]
    assert st["uniform_widths"] and st["params"] < 0.82 * st["params_dense"]
    x = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(x).logits
    out, how = save_compressed(model, tok, tmp_path / "m")
    assert how.startswith("plain")
    assert _plain_diff(out, x, ref, tmp_path) < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    if pattern == "width":
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (6, 3, 64)
        assert cfg["intermediate_size"] < 1536 and cfg["attention_bias"] and cfg["mlp_bias"]
    else:
        assert cfg["num_hidden_layers"] == 22
