"""The recovery control (the dense model trained with the same recipe) in the library and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save_tiny
from prunekit import PruneConfig, load_model, prune
from prunekit.cli import main
from prunekit.formats import save_model
from prunekit.recover import RecoverConfig
from prunekit.recover.control import compare, train_control
from prunekit.recover.trainer import Trainer


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def folders(tmp_path):
    dense = save_tiny(tmp_path / "dense")
    model, tok = load_model(str(dense))
    save_model(model, tok, tmp_path / "pruned", prune(model, PruneConfig(method="magnitude", sparsity=0.5)).to_dict())
    txt = tmp_path / "train.txt"
    txt.write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    return dense, tmp_path / "pruned", txt


def _ev(ppl: float, acc: float | None = None, se: float = 0.02) -> dict:
    out = {"ppl": {"wikitext2": {"ppl": ppl}}, "tasks": {}}
    if acc is not None:
        out["tasks"]["piqa"] = {"main": "acc", "metrics": {"acc": acc}, "stderr": {"acc": se}}
    return out


def test_compare_gives_both_ratios_and_task_verdicts():
    student = {"before": _ev(56.0, 0.60), "after": _ev(30.0, 0.62)}
    control = {"before": _ev(24.0, 0.66), "after": _ev(20.0, 0.70)}
    ppl, task = compare(student, control)
    assert (ppl.metric, ppl.one_shot, ppl.recovered, ppl.dense, ppl.tuned_dense) == ("ppl:wikitext2", 56.0, 30.0, 24.0, 20.0)
    assert (ppl.vs_dense, ppl.vs_tuned_dense) == ("1.25x", "1.50x")
    assert task.metric == "task:piqa/acc"
    assert task.vs_dense == "tie"  # 0.04 apart, 2 stderr of the difference = 0.057
    assert task.vs_tuned_dense == "worse"  # 0.08 apart
    lone = compare(student, {})  # no control measured: said, not invented
    assert lone[0].vs_tuned_dense == "-" and lone[1].vs_dense == "-"


def test_train_control_refuses_the_teacher_object(folders):
    dense, _, txt = folders
    teacher, tok = load_model(str(dense))
    with pytest.raises(ValueError, match="copy of the dense model"):
        train_control(teacher, teacher, tok, RecoverConfig(data=str(txt), tokens=64, seqlen=32))


def test_distilling_the_dense_model_from_itself_starts_at_zero_loss(folders):
    """The KD control starts at zero KL, yet it moves: Adam turns even rounding-level gradients into
    steps of about the learning rate — which is why the control is measured, never assumed."""
    dense, _, txt = folders
    model, tok = load_model(str(dense))
    teacher, _ = load_model(str(dense))
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = RecoverConfig(data=str(txt), tokens=128, seqlen=32, batch_size=2, grad_accum=1, val_windows=2,
                        teacher_dtype="float32", lr=1e-2)
    rep = train_control(model, teacher, tok, cfg)
    assert rep.validation_before["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rep.steps == 2
    moved = max(float((p.detach() - ref[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad)
    assert 0 < moved <= 2 * 1e-2 * 1.01  # at most one lr per Adam step


def test_cli_control_trains_dense_too_and_reports_the_ratio(tmp_path, folders, capsys):
    dense, pruned, txt = folders
    out = tmp_path / "out"
    rc = main(["recover", str(pruned), "--teacher", str(dense), "--out", str(out), "--data", str(txt), "--tokens", "128",
               "--seqlen", "32", "--batch-size", "2", "--grad-accum", "1", "--val-windows", "2", "--eval", str(txt),
               "--eval-seqlen", "32", "--max-windows", "2", "--kl-weight", "0", "--ce-weight", "1", "--lr", "1e-2",
               "--control"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "tuned dense" in text and "vs tuned dense" in text
    rep = json.loads((out / "prunekit_report.json").read_text())
    ctrl = rep["control"]
    assert ctrl["report"]["tokens"] == rep["recover"]["tokens"] == 128
    assert ctrl["report"]["config"] == rep["recover"]["config"]  # the same recipe, text and tokens
    row = ctrl["comparison"][0]
    tuned = ctrl["report"]["evaluation"]["after"]["ppl"][str(txt)]["ppl"]
    dense_ppl = ctrl["report"]["evaluation"]["before"]["ppl"][str(txt)]["ppl"]
    assert row["tuned_dense"] == tuned and row["dense"] == dense_ppl and tuned != dense_ppl  # next-token loss moved it
    assert row["vs_tuned_dense"] == f"{row['recovered'] / tuned:.2f}x"


@pytest.mark.parametrize("extra, needle", [(["--kl-weight", "0", "--ce-weight", "1"], "pass it as --teacher"),
                                           (["--teacher", "T", "--eval"], "--control compares evaluations")])
def test_cli_control_bad_input_fails_before_training(tmp_path, folders, capsys, monkeypatch, extra, needle):
    dense, pruned, txt = folders
    monkeypatch.setattr(Trainer, "run", lambda self: (_ for _ in ()).throw(AssertionError("trained")))
    argv = ["recover", str(pruned), "--out", str(tmp_path / "o"), "--data", str(txt), "--tokens", "64", "--seqlen", "32",
            "--control", *[str(dense) if x == "T" else x for x in extra]]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and needle in err
