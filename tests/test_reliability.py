"""Faults and bad input through the CLI: one line naming the value and the fix, before any work
where possible, nothing half-written, nothing silent (docs/reliability.md lists what each backs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from conftest import REPO, calib_text, held_by_another_run, prune_argv, run_cli, save_tiny
from prunekit.cli import main
from prunekit.formats import reserve_output


@pytest.fixture
def no_load(monkeypatch):
    """Fails the test if a model is loaded: the error must come before any work."""
    import prunekit.formats as formats

    monkeypatch.setattr(formats, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the error"))


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_nan_outside_the_linears_fails_and_saves_nothing(tmp_path, capsys, tiny_folder):
    f = tiny_folder / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.input_layernorm.weight"][3] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, out, calib_text(tmp_path)))
    assert rc == 2 and err.splitlines()[-1] == (
        "error: model.layers.0.input_layernorm.weight has 1 NaN/Inf values; the model is corrupt: reload or "
        "re-download it")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_sweep_resumed_in_another_dtype_is_refused(tmp_path, capsys, tiny_folder):
    calib = calib_text(tmp_path)
    argv = ["sweep", tiny_folder, "--methods", "magnitude", "--sparsities", "0", "0.5", "--calib", calib,
            "--nsamples", "2", "--seqlen", "16", "--eval", calib, "--eval-seqlen", "32", "--max-windows", "1",
            "--out", tmp_path / "sw"]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    rc, err, _ = run_cli(capsys, *argv, "--dtype", "bfloat16")
    assert rc == 2 and "dtype: stored 'float32', now 'bfloat16'" in err and "use another --out folder" in err


def test_bad_json_path_fails_before_loading(tmp_path, capsys, tiny_folder, no_load):
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, tmp_path / "out", calib_text(tmp_path),
                                             "--json", tmp_path / "no" / "r.json"))
    assert rc == 2 and f"--json '{tmp_path / 'no' / 'r.json'}': folder '{tmp_path / 'no'}' does not exist" in err


def test_the_model_is_saved_before_the_json_report(tmp_path, capsys, tiny_folder):
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main([str(a) for a in prune_argv(tiny_folder, out, calib_text(tmp_path), "--json", report)]) == 0
    assert out.stat().st_mtime_ns <= report.stat().st_mtime_ns
    assert json.loads(report.read_text())["method"] == "magnitude"


def test_disk_full_in_a_foreign_writer_is_one_line(tmp_path, capsys, tiny_folder, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def full(*a, **k):  # what the tokenizers crate raises: not an OSError
        raise RuntimeError('Os { code: 28, kind: StorageFull, message: "No space left on device" }')

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    out = tmp_path / "out"
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, out, calib_text(tmp_path)))
    assert rc == 2 and f"disk full while writing '{out}'; nothing was left behind" in err
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_truncated_safetensors_names_the_file(tmp_path, capsys, tiny_folder, command):
    f = tiny_folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    argv = (prune_argv(tiny_folder, tmp_path / "out", calib_text(tmp_path)) if command == "prune"
            else ["eval", tiny_folder])
    rc, err, _ = run_cli(capsys, *argv)
    assert rc == 2 and f"error: {f} is damaged (" in err and "re-download the model or save it again" in err


def test_binary_calibration_file_is_named(tmp_path, capsys, tiny_folder):
    f = tmp_path / "calib.txt"
    f.write_bytes(b"text\xc8\x00\xff" * 100)
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, tmp_path / "out", f))
    assert rc == 2 and f"error: {f} is not UTF-8 text (byte 0xc8 at offset 4)" in err


@pytest.mark.parametrize("extra, message", [
    (["--option", "percdamp=abc", "--method", "sparsegpt"],
     "method 'sparsegpt' option percdamp='abc' is invalid: it must be a number in (0.0, 10.0) (default 0.01)"),
    (["--include", "mlp("], "--include regex 'mlp(' is invalid"),
    (["--threads", "-1"], "--threads=-1 is invalid: give a positive number of CPU threads"),
    (["--threads", "0"], "--threads=0 is invalid"),
    (["--tasks", "mmlu:shots=abc"], "task 'mmlu:shots=abc' option shots='abc' is invalid: it must be an integer"),
    (["--alloc-option", "lamda=1", "--allocation", "owl"], "allocation 'owl' has no option 'lamda'"),
])
def test_bad_values_fail_before_loading(tmp_path, capsys, tiny_folder, no_load, extra, message):
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, tmp_path / "out", calib_text(tmp_path), *extra))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0]


def test_out_under_a_file_is_named(tmp_path, capsys, tiny_folder, no_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, blocker / "out", calib_text(tmp_path)))
    assert rc == 2 and f"cannot create the folder '{blocker}' for --out" in err


def test_too_long_eval_seqlen_fails_before_pruning(tmp_path, capsys, tiny_folder, monkeypatch):
    import prunekit.api as api

    monkeypatch.setattr(api, "prune", lambda *a, **k: pytest.fail("pruned before the eval seqlen was checked"))
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, tmp_path / "out", calib_text(tmp_path),
                                             "--eval-seqlen", "4096"))
    assert rc == 2 and "--eval-seqlen=4096 exceeds the model's context length 256" in err


@pytest.mark.parametrize("command", ["export", "analyze", "sweep", "eval"])
def test_pickle_only_models_need_allow_pickle_everywhere(tmp_path, capsys, command):
    import torch

    folder = save_tiny(tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    calib = calib_text(tmp_path)
    argv = {"export": ["export", folder, "--out", tmp_path / "x"],
            "analyze": ["analyze", folder, "--out", tmp_path / "x", "--no-plots", "--brief"],
            "sweep": ["sweep", folder, "--methods", "magnitude", "--sparsities", "0", "--eval", calib, "--eval-seqlen",
                      "32", "--max-windows", "1", "--out", tmp_path / "x"],
            "eval": ["eval", folder, "--datasets"]}[command]
    rc, err, _ = run_cli(capsys, *argv)
    assert rc == 2 and "has only pickled weights (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert not (tmp_path / "x").exists()  # analyze made no empty folder either
    assert main([str(a) for a in argv] + ["--allow-pickle"]) == 0


def test_interrupted_sweep_says_what_was_kept(tmp_path, capsys, tiny_folder, monkeypatch):
    import prunekit.sweep.run as run

    real, calls = run.run_cell, []

    def once(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run, "run_cell", once)
    calib = calib_text(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in ["sweep", tiny_folder, "--methods", "magnitude", "--sparsities", "0", "0.3", "0.6",
                               "--calib", calib, "--nsamples", "2", "--seqlen", "16", "--eval", calib, "--eval-seqlen",
                               "32", "--max-windows", "1", "--out", tmp_path / "sw"]])
    assert e.value.code == 130
    assert f"interrupted; 2 finished cell(s) are saved in {tmp_path / 'sw' / 'results.json'}" in capsys.readouterr().err


def test_a_second_prune_to_a_busy_out_fails_before_loading(tmp_path, capsys, tiny_folder, no_load):
    out = tmp_path / "out"
    with held_by_another_run(out) as pid:
        rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, out, calib_text(tmp_path)))
    assert rc == 2 and f"--out '{out}' is being written by another prunekit run (process {pid})" in err


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, tiny_folder):
    out = tmp_path / "out"
    argv = prune_argv(tiny_folder, out, calib_text(tmp_path), "--no-dense-eval")
    code = ("import time, prunekit.api as api\n"
            "def slow(*a, **k):\n    print('pruning', flush=True)\n    time.sleep(60)\n"
            "api.prune = slow\n"
            "from prunekit.cli import main\n"
            f"raise SystemExit(main({[str(a) for a in argv]!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().startswith("loaded")
    assert proc.stdout.readline() == "pruning\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated; nothing was saved"
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a folder nobody can create files in (Linux /proc)")
def test_an_out_folder_that_cannot_be_created_is_one_line_naming_it():
    from prunekit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--out '/proc/prunekit-x' cannot be written .*folder '/proc'"):
        with reserve_output("/proc/prunekit-x"):
            pass
