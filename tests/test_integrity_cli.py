"""Issue 27's partial answers, each tried as a user would through the CLI: one line naming the value and
the fix, before any work where possible, nothing lost (docs/reliability.md lists what each backs)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from safetensors.torch import load_file, save_file

from conftest import calib_text, error_line, prune_argv, run_cli, save_tiny
from prunekit.cli import main


# ------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("command", ["prune", "eval", "export", "analyze"])
def test_custom_architecture_without_trust_remote_code(tmp_path, capsys, tiny_folder, command, no_weights):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg.update(model_type="mycustom", architectures=["MyForCausalLM"],
               auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (tiny_folder / "config.json").write_text(json.dumps(cfg))
    (tiny_folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    calib = calib_text(tmp_path)
    argv = {"prune": prune_argv(tiny_folder, tmp_path / "o", calib), "eval": ["eval", tiny_folder],
            "export": ["export", tiny_folder, "--out", tmp_path / "o"],
            "analyze": ["analyze", tiny_folder, "--out", tmp_path / "o", "--no-plots"]}[command]
    rc, err, _ = run_cli(capsys, *argv)
    line = error_line(err)
    assert rc == 2 and str(tiny_folder) in line and "--trust-remote-code" in line and "modeling_my.py" in line
    assert not (tmp_path / "o").exists()


def test_allow_pickle_on_a_malicious_pickle_is_one_line_without_torchs_advice(tmp_path, capsys):
    folder = save_tiny(tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    rc, err, _ = run_cli(capsys, "eval", folder, "--allow-pickle", "--datasets")
    line = error_line(err)
    assert rc == 2 and "pytorch_model.bin" in line and "weights_only" not in err and not marker.exists()
    assert "safetensors" in line


def test_compressed_folder_without_tokenizer_json(tmp_path, capsys, tiny_folder):
    calib = calib_text(tmp_path)
    out = tmp_path / "c"
    assert main([str(a) for a in prune_argv(tiny_folder, out, calib, "--save-format", "compressed")]) == 0
    capsys.readouterr()
    (out / "tokenizer.json").unlink()
    rc, err, _ = run_cli(capsys, "eval", out, "--datasets", calib, "--seqlen", "32")
    line = error_line(err)
    assert rc == 2 and str(out) in line and "tokenizer.json" in line and "sentencepiece" not in err


# ------------------------------------------------------------------------------ flags named right

def test_too_long_seqlen_is_reported_under_its_own_flag(tmp_path, capsys, tiny_folder, monkeypatch):
    import prunekit.api as api

    monkeypatch.setattr(api, "prune", lambda *a, **k: pytest.fail("pruned before the seqlen was checked"))
    calib = calib_text(tmp_path)
    argv = ["prune", tiny_folder, "--calib", calib, "--seqlen", "100000", "--eval", calib, "--out", tmp_path / "o"]
    rc, err, _ = run_cli(capsys, *argv)
    assert rc == 2 and "--seqlen=100000 exceeds the model's context length 256" in error_line(err)
    rc, err, _ = run_cli(capsys, "eval", tiny_folder, "--seqlen", "100000", "--datasets", calib)
    assert rc == 2 and "--seqlen=100000 exceeds" in error_line(err)
    rc, err, _ = run_cli(capsys, "sweep", tiny_folder, "--methods", "magnitude", "--sparsities", "0.5",
                         "--calib", calib, "--seqlen", "32", "--eval", calib, "--out", tmp_path / "sw")
    assert rc == 2 and "--eval-seqlen=1024 exceeds" in error_line(err)  # sweep's default window, named as a flag


@pytest.mark.parametrize("extra, words", [
    (["--pattern", "heads", "--method", "sparsegpt"],
     ["method 'sparsegpt' prunes single weights", "--pattern heads", "flap", "slimgpt"]),
    (["--method", "shortgpt"], ["'shortgpt' removes whole blocks or FFNs", "--pattern blocks"]),
    (["--method", "slimgpt", "--pattern", "2:4"], ["'slimgpt' removes whole heads/channels", "--pattern channels"]),
])
def test_method_and_pattern_mismatch_names_what_serves_it(tmp_path, capsys, tiny_folder, no_weights, extra, words):
    argv = ["prune", tiny_folder, "--calib", calib_text(tmp_path), "--out", tmp_path / "o", *extra]
    rc, err, _ = run_cli(capsys, *argv)
    line = error_line(err)
    assert rc == 2 and all(w in line for w in words), line


def test_a_holdout_that_leaves_nothing_to_fit_is_refused_before_loading(tmp_path, capsys, tiny_folder, no_weights):
    argv = ["prune", tiny_folder, "--method", "wanda", "--refine", "reconstruct", "--refine-option", "holdout=4",
            "--nsamples", "4", "--calib", calib_text(tmp_path), "--out", tmp_path / "o"]
    rc, err, _ = run_cli(capsys, *argv)
    assert rc == 2 and "--refine-option holdout=4 leaves none of the 4 calibration sequences" in error_line(err)
    assert not (tmp_path / "o").exists()


def test_eval_none_skips_perplexity_as_the_help_says(tmp_path, capsys, tiny_folder):
    rc, err, out = run_cli(capsys, "prune", tiny_folder, "--method", "magnitude", "--calib", calib_text(tmp_path),
                        "--nsamples", "2", "--seqlen", "32", "--eval", "none", "--out", tmp_path / "o")
    assert rc == 0, err[-2000:]
    assert "ppl" not in out and (tmp_path / "o" / "config.json").is_file()


# ------------------------------------------------------------------------------ NaN named

def test_analyze_with_nan_in_a_linear_names_the_tensor(tmp_path, capsys, tiny_folder):
    f = tiny_folder / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][2, 3] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    rc, err, _ = run_cli(capsys, "analyze", tiny_folder, "--out", tmp_path / "a", "--no-plots", "--brief")
    assert rc == 2 and "model.layers.1.mlp.up_proj.weight has 1 NaN/Inf values" in error_line(err)
    assert not (tmp_path / "a").exists()


def test_eval_with_nan_in_a_norm_names_the_tensor(tmp_path, capsys, tiny_folder):
    f = tiny_folder / "model.safetensors"
    sd = load_file(f)
    sd["model.norm.weight"][5] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    rc, err, _ = run_cli(capsys, "eval", tiny_folder, "--datasets", calib_text(tmp_path), "--seqlen", "32")
    assert rc == 2 and "model.norm.weight has 1 NaN/Inf values" in error_line(err)


def test_infinite_perplexity_is_an_error_naming_the_window(tmp_path):
    import torch

    from conftest import tiny_model
    from prunekit.errors import ConfigError
    from prunekit.eval.perplexity import perplexity_of_ids

    model = tiny_model()
    with torch.no_grad():  # huge but finite logits: a log-loss above 709 nats, exp() of which is inf
        model.lm_head.weight.mul_(1e6)
    ids = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=r"^wiki: window 0 \(tokens 0-31\) have a mean log-loss of .* the "
                                          r"perplexity would be inf"):
        perplexity_of_ids(model, ids, 32, name="wiki")
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(ConfigError, match="perplexity would be nan"):
        perplexity_of_ids(model, ids, 32, batch_size=2, name="wiki")


# ------------------------------------------------------------------------------ sweep on Ray

@pytest.mark.parametrize("address, words", [
    ("garbage:::", ["--ray 'garbage:::'", "HOST:PORT"]),
    ("ray://127.0.0.1:10001", ["ray://", "ray[client]"]),
])
def test_bad_ray_addresses_are_one_line_before_loading(tmp_path, capsys, tiny_folder, no_weights, address, words,
                                                       monkeypatch):
    pytest.importorskip("ray")
    if address.startswith("ray://"):
        import prunekit.sweep.ray_executor as rx

        monkeypatch.setattr(rx, "ray_client_missing", lambda: "grpcio is not installed")
    calib = calib_text(tmp_path)
    rc, err, _ = run_cli(capsys, "sweep", tiny_folder, "--methods", "magnitude", "--sparsities", "0.5",
                         "--calib", calib, "--eval", calib, "--eval-seqlen", "32", "--out", tmp_path / "sw",
                         f"--ray={address}")
    line = error_line(err)
    assert rc == 2 and all(w in line for w in words), line
