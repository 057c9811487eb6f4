"""``prunekit recover``: end to end on a tiny model folder, and bad input fails before any training."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit import load_model
from prunekit.cli import main
from prunekit.models import decoder_linears
from prunekit.recover.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def small(txt, *extra):
    return ["--data", str(txt), "--tokens", "256", "--seqlen", "32", "--batch-size", "2", "--grad-accum", "2",
            "--val-windows", "2", "--eval", str(txt), "--eval-seqlen", "32", "--max-windows", "2",
            "--teacher-dtype", "float32", *extra]


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_recover_end_to_end(tmp_path, pruned_folders, capsys, trainable):
    if trainable == "lora":
        pytest.importorskip("peft")
    dense, pruned, txt = pruned_folders
    out = tmp_path / "out"
    rc = main(["recover", str(pruned), "--teacher", str(dense), "--out", str(out), "--checkpoint-every", "1",
               "--trainable", trainable, "--lr", "1e-2", *small(txt)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "sparsity of decoder linears" in text and "saved to" in text
    before, _ = load_model(str(pruned))
    after, _ = load_model(str(out))  # loads like any prunekit output
    changed = False
    for (n, a), (_, b) in zip(decoder_linears(before).items(), decoder_linears(after).items()):
        assert torch.equal(a.weight == 0, b.weight == 0), n
        changed |= not torch.equal(a.weight, b.weight)
    assert changed
    rep = json.loads((out / "prunekit_report.json").read_text())
    r = rep["recover"]
    assert r["tokens"] == 256 and r["steps"] == 2 and r["masks_kept"]
    assert r["sparsity_before"] == r["sparsity_after"] and r["data"]["name"] == str(txt)
    assert {"before", "after"} <= set(r["evaluation"]) and rep["compression"]["method"] == "magnitude"
    assert ("unmasked_merge" in r["evaluation"]) == (trainable == "lora")
    assert not (tmp_path / "out.checkpoint").exists()  # removed once the model is saved


@pytest.fixture
def no_training(monkeypatch):
    def boom(self):
        raise AssertionError("training started although the input was bad")

    monkeypatch.setattr(Trainer, "run", boom)


def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    last = err[-1]
    assert last.startswith("error: ") and all(s in last for s in needles), last
    return last


@pytest.mark.parametrize("flags, needles", [
    (["--data", "nosuchdata"], ["unknown dataset 'nosuchdata'", "austen"]),
    (["--tokens", "0"], ["tokens=0", "--tokens"]),
    (["--tokens", "-5"], ["tokens=-5"]),
    (["--lr", "-1"], ["lr=-1.0"]),
    (["--optimizer", "galore", "--trainable", "lora"], ["galore", "lora"]),
])
def test_bad_settings_fail_before_loading(tmp_path, pruned_folders, capsys, no_training, flags, needles):
    dense, pruned, txt = pruned_folders
    argv = ["recover", str(pruned), "--teacher", str(dense), "--out", str(tmp_path / "o"), *small(txt)]
    _fails(capsys, argv + flags, *needles)
    assert not (tmp_path / "o").exists()


def test_training_on_a_test_split_is_refused(tmp_path, pruned_folders, capsys, no_training):
    dense, pruned, txt = pruned_folders
    test_file = tmp_path / "wiki.test.raw"
    test_file.write_text(txt.read_text())
    _fails(capsys, ["recover", str(pruned), "--teacher", str(dense), "--out", str(tmp_path / "o"),
                    *small(txt), "--data", str(test_file)], "wiki.test.raw", "evaluation (test) split")


def test_too_short_text_fails_before_training(tmp_path, pruned_folders, capsys, no_training):
    dense, pruned, _ = pruned_folders
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    _fails(capsys, ["recover", str(pruned), "--teacher", str(dense), "--out", str(tmp_path / "o"), *small(short)],
           "too short", "seqlen=32")


def test_vocabulary_mismatch_fails_before_training(tmp_path, pruned_folders, capsys, no_training):
    _, pruned, txt = pruned_folders
    other = tmp_path / "other"
    tok = tiny_tokenizer(320)
    tiny_model("llama", vocab_size=len(tok) + 64).save_pretrained(other)
    tok.save_pretrained(other)
    _fails(capsys, ["recover", str(pruned), "--teacher", str(other), "--out", str(tmp_path / "o"), *small(txt)],
           "vocabularies differ", f"({len(tok) + 64} vs {len(tok)} tokens)", "same tokenizer")


def test_missing_model_existing_out_and_missing_teacher(tmp_path, pruned_folders, capsys, no_training):
    dense, pruned, txt = pruned_folders
    _fails(capsys, ["recover", str(tmp_path / "nope"), "--teacher", str(dense), "--out", str(tmp_path / "o"),
                    *small(txt)], "not found", "nope")
    out = tmp_path / "exists"
    out.mkdir()
    _fails(capsys, ["recover", str(pruned), "--teacher", str(dense), "--out", str(out), *small(txt)],
           "already exists", "--overwrite")
    _fails(capsys, ["recover", str(pruned), "--out", str(tmp_path / "o"), *small(txt)], "--teacher")


def test_prune_chains_recover(tmp_path, pruned_folders, capsys):
    dense, _, txt = pruned_folders
    out = tmp_path / "pr"
    rc = main(["prune", str(dense), "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--eval",
               "--recover", "--recover-option", f"data={txt}", "--recover-option", "tokens=128",
               "--recover-option", "seqlen=32", "--recover-option", "grad_accum=2", "--recover-option", "val_windows=2",
               "--recover-option", "teacher_dtype=float32", "--recover-option", "lr=0.01"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    rep = json.loads((out / "prunekit_report.json").read_text())
    r = rep["extra"]["recover"]
    assert r["steps"] == 2 and r["masks_kept"] and r["sparsity_after"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    model, _ = load_model(str(out))
    zeros = sum(int((m.weight == 0).sum()) for m in decoder_linears(model).values())
    assert zeros == r["sparsity_after"]["zeros"]


def test_prune_recover_bad_option_fails_before_loading(tmp_path, pruned_folders, capsys, no_training):
    dense, _, txt = pruned_folders
    base = ["prune", str(dense), "--method", "magnitude", "--out", str(tmp_path / "o"), "--eval", "--recover"]
    _fails(capsys, base + ["--recover-option", "tokens=0"], "tokens=0")
    _fails(capsys, base + ["--recover-option", "tokenz=5"], "'tokenz'", "tokens")
    _fails(capsys, base[:-1] + ["--recover-option", "tokens=5"], "without --recover")


def test_interrupted_recover_resumes_to_the_same_model(tmp_path, pruned_folders, capsys, monkeypatch):
    """Ctrl-C after step 2 keeps OUT.checkpoint; the same command resumes there and saves exactly the
    model an uninterrupted run saves."""
    import prunekit.cli.recover as cli_recover

    dense, pruned, txt = pruned_folders
    argv = ["recover", str(pruned), "--teacher", str(dense), "--checkpoint-every", "1", "--lr", "1e-2",
            *small(txt, "--tokens", "512")]
    assert main(argv + ["--out", str(tmp_path / "ref")]) == 0
    real = cli_recover.progress_bar

    def interrupting(total):
        bar, on_step = real(total)

        def step(info):
            on_step(info)
            if info.step == 2:
                raise KeyboardInterrupt

        return bar, step

    monkeypatch.setattr(cli_recover, "progress_bar", interrupting)
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert (tmp_path / "out.checkpoint" / "state.pt").is_file() and not out.exists()
    monkeypatch.setattr(cli_recover, "progress_bar", real)
    assert main(argv + ["--out", str(out)]) == 0
    rep = json.loads((out / "prunekit_report.json").read_text())["recover"]
    assert rep["resumed_from"] == 2 and rep["steps"] == 4
    a, _ = load_model(str(tmp_path / "ref"))
    b, _ = load_model(str(out))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_recover_option_values_are_typed_like_the_user_wrote_them():
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; an option value that is a number is a number."""
    from prunekit.cli.recover import _yaml_values

    got = _yaml_values(["lr=5e-4", "grad_accum=1", "betas=[0.9, 0.95]", "data=austen", "bf16=true"])
    assert got == {"lr": 5e-4, "grad_accum": 1, "betas": [0.9, 0.95], "data": "austen", "bf16": True}
    assert isinstance(got["grad_accum"], int)
    assert _yaml_values(["data=inf", "data2=nan"]) == {"data": "inf", "data2": "nan"}  # words stay words


def test_recover_keeps_and_recalibrates_activation_thresholds(tmp_path, pruned_folders, capsys, data_dir):
    """A folder with activation thresholds trains with them and is saved with re-calibrated ones (it used
    to be saved without them: a plain dense model)."""
    from prunekit import ActivationSparsityConfig, CalibConfig, sparsify_activations
    from prunekit.formats import save_with_thresholds
    from prunekit.models.activation import state_of

    dense, _, txt = pruned_folders
    model, tok = load_model(str(dense))
    sparsify_activations(model, ActivationSparsityConfig(sparsity=0.4, calib=CalibConfig("austen", 4, 32, 0)),
                         tokenizer=tok, data_dir=data_dir)
    act, out = tmp_path / "act", tmp_path / "out"
    save_with_thresholds(model, tok, act)
    rc = main(["recover", str(act), "--teacher", str(dense), "--out", str(out), "--lr", "1e-2", *small(txt)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "teal activation sparsity (target 0.40)" in text and "(re-calibrated)" in text
    after, _ = load_model(str(out))
    state = state_of(after)
    assert state is not None and set(state.sites) == set(state_of(model).sites)
    r = json.loads((out / "prunekit_report.json").read_text())["recover"]["activation"]
    assert r["recalibrated"] and r["sparsity"] == pytest.approx(0.4, abs=0.03)
    before = state_of(model).thresholds
    assert any(not torch.equal(state.thresholds[n], before[n]) for n in before)  # the saved ones are the new ones
