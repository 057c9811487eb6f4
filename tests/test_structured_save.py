"""Saving structurally pruned models: plain folders that stock transformers loads (checked in a process
that never imports prunekit), prunekit's format for per-block widths, and the CLI's messages."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import save_tiny, tiny_tokenizer
from test_structured import _ids, _logits, arch_model
from prunekit import PruneConfig, load_model, prune
from prunekit.cli import main
from prunekit.formats import save_compressed
from prunekit.formats.structured import PRUNEKIT
from prunekit.formats.structured_plain import is_restructured, plain_config
from prunekit.models import find_blocks
from prunekit.formats.structured import MANIFEST

_PLAIN_CHECK = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
x, ref = torch.load(sys.argv[2]), torch.load(sys.argv[3])
with torch.no_grad():
    d = (m(input_ids=x).logits - ref).abs().max().item()
assert "prunekit" not in sys.modules
print("DIFF", d)
"""


def _plain_diff(folder, x, ref, tmp_path) -> float:
    """Max |logits - ref| of ``folder`` loaded by plain transformers in a fresh process without prunekit."""
    torch.save(x, tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _PLAIN_CHECK, str(folder), str(tmp_path / "x.pt"),
                           str(tmp_path / "ref.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split("DIFF")[-1])


@pytest.mark.parametrize("arch,pattern,method", [
    ("llama", "width", "flap"),  # FLAP's biases on o/down: the config's bias switches, zeros elsewhere
    ("llama", "heads", "slimgpt"),
    ("qwen2", "channels", "wanda"),
    ("gemma2", "blocks", "shortgpt"),  # layer_types filtered to the kept blocks
    ("gemma3", "width", "wanda"),
    ("opt", "channels", "magnitude"),
    ("gpt2", "blocks", "ppl"),
    ("gpt_neox", "channels", "flap"),
])
def test_uniform_saves_plain_and_stock_transformers_gives_the_same_logits(arch, pattern, method, tmp_path):
    model = arch_model(arch)
    sparsity = {"heads": 0.1, "blocks": 0.5 if arch == "gpt2" else 0.25}.get(pattern, 0.25)  # gpt2: 2 blocks
    prune(model, PruneConfig(method=method, pattern=pattern, sparsity=sparsity,
                             method_options={} if pattern == "blocks" else {"multiple": 8}), calib=_ids())
    x = _ids(2)
    ref = _logits(model, x)
    out, how = save_compressed(model, None, tmp_path / "m")
    assert how.startswith("plain") and (out / "model.safetensors").is_file() and not (out / MANIFEST).exists()
    assert _plain_diff(out, x, ref, tmp_path) < 1e-5
    cfg = json.loads((out / "config.json").read_text())
    if pattern == "blocks":
        n = len(find_blocks(model)[1])
        assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == n < arch_model(arch).config.num_hidden_layers
        if arch == "gemma2":
            assert cfg["layer_types"] == model.config.layer_types and n == 3


def test_llama_flap_plain_config_says_the_new_widths(tmp_path):
    model = arch_model("llama")
    prune(model, PruneConfig(method="flap", pattern="width", sparsity=0.25, method_options={"multiple": 8}),
          calib=_ids())
    cfg, zeros = plain_config(model)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (2, 2, 16, 104)
    assert cfg.attention_bias and cfg.mlp_bias  # o/down got FLAP biases; q/k/v/gate/up are saved as zeros
    assert sorted({k.rsplit(".", 2)[-2] for k in zeros}) == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize("arch,pattern,allocation", [
    ("llama", "width", "owl"), ("qwen2", "width", "uniform"),  # Qwen2 has no switch for an o_proj bias
    ("gpt2", "heads", "uniform"),  # GPT-2's config derives head size from hidden / heads
    ("gpt2", "ffn", "uniform"),  # a dropped Conv1D FFN becomes a width-0 nn.Linear
    ("gemma3", "width", "global"), ("mistral", "ffn", "uniform"), ("opt", "width", "global"),
])
def test_nonuniform_saves_prunekit_format_and_reloads_as_smaller_linears(arch, pattern, allocation, tmp_path):
    model = arch_model(arch)
    prune(model, PruneConfig(method="flap" if pattern != "ffn" else "shortgpt", pattern=pattern,
                             sparsity=0.1 if pattern == "heads" else 0.25,
                             allocation=allocation, method_options={} if pattern == "ffn" else {"multiple": 8}),
          calib=_ids())
    assert is_restructured(model)
    x = _ids(2)
    ref = _logits(model, x)
    out, how = save_compressed(model, tiny_tokenizer(128), tmp_path / "m")
    assert how.startswith(PRUNEKIT) and (out / MANIFEST).is_file() and not (out / "model.safetensors").exists()
    back, _ = load_model(str(out))
    torch.testing.assert_close(_logits(back, x), ref, atol=1e-6, rtol=1e-6)
    sizes = {n: tuple(p.shape) for n, p in back.named_parameters()}
    assert sizes == {n: tuple(p.shape) for n, p in model.named_parameters()}  # real smaller linears, no padding
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):  # plain transformers refuses the folder instead of guessing
        AutoModelForCausalLM.from_pretrained(out)


def test_unpruned_model_is_not_restructured():
    assert not is_restructured(arch_model("llama"))


@pytest.mark.parametrize("allocation,expect", [("uniform", "plain Hugging Face folder"),
                                               ("owl", "prunekit structured format")])
def test_cli_prints_which_loader_reads_the_folder(tmp_path, capsys, data_dir, allocation, expect):
    folder = save_tiny(tmp_path / "tiny")
    out = tmp_path / "out"
    rc = main(["prune", str(folder), "--pattern", "width", "--sparsity", "0.25", "--allocation", allocation,
               "--option", "multiple=8", "--nsamples", "4", "--seqlen", "32", "--eval", "wikitext2",
               "--max-windows", "1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and expect in text and "parameters (M)" in text
    report = json.loads((out / "prunekit_report.json").read_text())
    st = report["extra"]["structure"]
    back, _ = load_model(str(out))
    saved = st["save"].get("params_saved", st["params"])  # a plain folder may add zero biases (config switch)
    assert saved == sum(p.numel() for p in back.parameters()) and st["params"] < st["params_dense"]


def test_cli_bad_architecture_pattern_fails_before_the_dense_baseline(tmp_path, capsys):
    from transformers import Phi3Config, AutoModelForCausalLM

    tok = tiny_tokenizer(320)
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "phi3")
    tok.save_pretrained(tmp_path / "phi3")
    rc = main(["prune", str(tmp_path / "phi3"), "--pattern", "channels", "--sparsity", "0.2", "--eval", "wikitext2"])
    captured = capsys.readouterr()
    assert rc == 2 and "Phi3ForCausalLM" in captured.err and "dense" not in captured.out.split("loaded", 1)[-1]
