"""``prunekit prune --activation-sparsity``, ``generate`` and ``bench`` end to end on a tiny saved model."""

from __future__ import annotations

import json

import pytest

import prunekit
from prunekit.activation import state_of
from prunekit.cli import main


def _calib_file(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(" ".join(f"word{i % 97} and then some more text number {i}." for i in range(3000)))
    return str(f)


def test_activation_alone_saves_thresholds_and_reloads(tiny_folder, tmp_path, capsys):
    out = tmp_path / "act"
    rc = main(["prune", str(tiny_folder), "--activation-sparsity", "0.4", "--act-method", "chess", "--calib",
               _calib_file(tmp_path), "--nsamples", "4", "--seqlen", "32", "--eval", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "activation sparsity (chess, uniform; calibration)" in text and "sparsity of pruned linears" not in text
    assert (out / "activation_sparsity.json").is_file() and (out / "activation_sparsity.safetensors").is_file()
    report = json.loads((out / "prunekit_report.json").read_text())
    assert report["method"] == "none" and report["extra"]["activation"]["method"] == "chess"
    model, _ = prunekit.load_model(str(out))
    st = state_of(model)
    assert st is not None and st.method == "chess"
    assert all((p != 0).all() for n, p in model.named_parameters() if "layers" in n and n.endswith("weight")
               and "norm" not in n)  # the weights stayed dense


def test_activation_after_weight_pruning(tiny_folder, tmp_path, capsys):
    out = tmp_path / "both"
    rc = main(["prune", str(tiny_folder), "--method", "magnitude", "--sparsity", "0.5", "--activation-sparsity",
               "0.3", "--calib", _calib_file(tmp_path), "--nsamples", "4", "--seqlen", "32", "--eval", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "sparsity of pruned linears" in text and "activation sparsity (teal" in text
    model, _ = prunekit.load_model(str(out))
    assert state_of(model) is not None
    assert main(["generate", str(out), "--prompt", "a b c", "--max-new-tokens", "3"]) == 0
    assert "decode speed-up" in capsys.readouterr().out
    js = tmp_path / "bench.json"
    assert main(["bench", str(out), "--repeats", "1", "--new-tokens", "2", "--prompt-tokens", "4",
                 "--prefill-tokens", "8", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["modules"]["linears"] == 14 and res["decode_sparsity_mean"] is not None


@pytest.mark.parametrize("argv,match", [
    (["--act-method", "cats"], "--act-method given without --activation-sparsity"),
    (["--activation-sparsity", "1.2"], "activation sparsity=1.2 is out of range"),
    (["--activation-sparsity", "0.4", "--act-method", "cats", "--act-allocation", "greedy"], "greedy"),
    (["--activation-sparsity", "0.4", "--offload", "disk"], "drop --offload disk"),
    (["--activation-sparsity", "0.4", "--act-max-tokens", "3"], "max_tokens"),
])
def test_prune_activation_flags_fail_in_one_line(tiny_folder, tmp_path, capsys, argv, match):
    assert main(["prune", str(tiny_folder), "--eval", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv,match", [
    (["generate", "{m}", "--prompt", "x", "--device", "cuda"], "run on the CPU"),
    (["generate", "{m}", "--prompt", "x", "--dtype", "float16"], "float32 or bfloat16"),
    (["generate", "{m}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens=0"),
    (["bench", "{m}", "--repeats", "0"], "--repeats=0"),
    (["bench", "{m}", "--prefill-tokens", "-1"], "--prefill-tokens=-1"),
])
def test_generate_and_bench_fail_in_one_line(tiny_folder, capsys, argv, match):
    assert main([a.replace("{m}", str(tiny_folder)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


def test_eval_prompt_tokens_scores_generation_of_a_saved_activation_model(tiny_folder, tmp_path):
    out = tmp_path / "act"
    calib = _calib_file(tmp_path)
    assert main(["prune", str(tiny_folder), "--activation-sparsity", "0.5", "--calib", calib, "--nsamples", "4",
                 "--seqlen", "32", "--eval", "--out", str(out)]) == 0
    res = {}
    for n in (0, 16):
        js = tmp_path / f"e{n}.json"
        assert main(["eval", str(out), "--datasets", calib, "--seqlen", "32", "--max-windows", "4",
                     "--prompt-tokens", str(n), "--json", str(js)]) == 0
        res[n] = json.loads(js.read_text())[calib]
    assert res[0]["tokens"] == 4 * 31 and res[16]["tokens"] == 4 * 16
    assert res[16]["ppl"] != res[0]["ppl"]
    assert main(["eval", str(out), "--datasets", calib, "--seqlen", "32", "--prompt-tokens", "31"]) == 2  # nothing left


def test_activation_sparsity_chains_recover_and_saves_recalibrated_thresholds(tiny_folder, tmp_path, capsys):
    """--activation-sparsity with --recover: trained with the thresholds, re-calibrated after (recover/activation.py)."""
    out, calib = tmp_path / "act-rec", _calib_file(tmp_path)
    rc = main(["prune", str(tiny_folder), "--activation-sparsity", "0.4", "--calib", calib, "--nsamples", "4",
               "--seqlen", "32", "--eval", calib, "--eval-seqlen", "32", "--max-windows", "2", "--out", str(out),
               "--recover", "--recover-option", f"data={calib}",
               "--recover-option", "tokens=128", "--recover-option", "seqlen=32", "--recover-option", "grad_accum=2",
               "--recover-option", "val_windows=2", "--recover-option", "teacher_dtype=float32"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "teal activation sparsity (target 0.40)" in text and "(re-calibrated)" in text
    extra = json.loads((out / "prunekit_report.json").read_text())["extra"]
    assert extra["recover"]["activation"]["recalibrated"]
    assert extra["activation"]["mean_sparsity"] == extra["recover"]["activation"]["sparsity"]
    assert state_of(prunekit.load_model(str(out))[0]) is not None
