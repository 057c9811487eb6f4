"""Recovery of an activation-sparse model: trained with its thresholds in place, re-calibrated after,
saved with them (``prunekit.recover.activation``)."""

from __future__ import annotations

import copy

import pytest
import torch

import prunekit
from conftest import tiny_model, tiny_tokenizer
from prunekit import ActivationSparsityConfig, CalibConfig
from prunekit.models.activation import state_of
from prunekit.recover import RecoverConfig, recover
from prunekit.activation.api import measured_sparsity

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = CalibConfig("austen", 4, 32, 0)


def _setup(tmp_path, data_dir):
    tok = tiny_tokenizer(320)
    teacher = tiny_model("llama", seed=0, vocab_size=len(tok))
    student = copy.deepcopy(teacher)
    state = prunekit.sparsify_activations(student, ActivationSparsityConfig(sparsity=0.4, calib=CALIB),
                                          tokenizer=tok, data_dir=data_dir)
    txt = tmp_path / "train.txt"
    txt.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    cfg = RecoverConfig(data=str(txt), tokens=16 * 2 * 2 * 6, seqlen=16, batch_size=2, grad_accum=2, val_windows=4,
                        lr=3e-2, teacher_dtype="float32", warmup_ratio=0.2)
    return tok, teacher, student, state, cfg


def _calib_ids(tok, data_dir):
    from prunekit.data import calibration_ids

    return calibration_ids(CALIB, tok, data_dir)


def test_measured_sparsity_is_the_calibration_reports(data_dir):
    tok = tiny_tokenizer(320)
    model = tiny_model("llama", seed=1, vocab_size=len(tok))
    ids = _calib_ids(tok, data_dir)
    state = prunekit.sparsify_activations(model, ActivationSparsityConfig(sparsity=0.4, calib=CALIB), calib=ids)
    assert measured_sparsity(model, ids) == pytest.approx(state.report["mean_sparsity"], abs=1e-3)
    assert all(state.mask(n).counter is None for n in state.sites)  # the counters are taken off again


def test_training_goes_through_the_masks(tmp_path, data_dir):
    """The hooks are in the forward pass while training: the thresholded student trains to other weights
    than the same student without thresholds."""
    tok, teacher, student, state, cfg = _setup(tmp_path, data_dir)
    plain = copy.deepcopy(student)
    state_of(plain).remove()
    del plain.prunekit_activation
    recover(student, copy.deepcopy(teacher), tok, cfg, data_dir=data_dir)
    recover(plain, copy.deepcopy(teacher), tok, cfg, data_dir=data_dir)
    w = dict(student.named_parameters())
    diff = max(float((w[n] - p).detach().abs().max()) for n, p in plain.named_parameters())
    assert diff > 1e-4


def test_thresholds_are_recalibrated_to_the_target_after_training(tmp_path, data_dir):
    tok, teacher, student, state, cfg = _setup(tmp_path, data_dir)
    old = {n: t.clone() for n, t in state.thresholds.items()}
    rep = recover(student, teacher, tok, cfg, data_dir=data_dir)
    act = rep.activation
    assert act["recalibrated"] and act["method"] == "teal" and act["target"] == 0.4
    new = state_of(student)
    assert new is not state and set(new.sites) == set(state.sites)
    assert any(not torch.equal(old[n], new.thresholds[n]) for n in old)  # training moved the activations
    ids = _calib_ids(tok, data_dir)
    assert measured_sparsity(student, ids) == pytest.approx(0.4, abs=0.02)
    assert act["sparsity"] == pytest.approx(0.4, abs=0.02)
    assert abs(act["trained_thresholds_sparsity"] - 0.4) > 0.005  # what the old ones would have claimed


def test_keep_thresholds_keeps_them_and_reports_their_sparsity(tmp_path, data_dir):
    tok, teacher, student, state, cfg = _setup(tmp_path, data_dir)
    old = {n: t.clone() for n, t in state.thresholds.items()}
    import dataclasses

    rep = recover(student, teacher, tok, dataclasses.replace(cfg, act_keep_thresholds=True), data_dir=data_dir)
    assert state_of(student) is state and all(torch.equal(old[n], state.thresholds[n]) for n in old)
    ids = _calib_ids(tok, data_dir)
    assert rep.activation["trained_thresholds_sparsity"] == pytest.approx(measured_sparsity(student, ids), abs=1e-9)
    assert not rep.activation["recalibrated"] and "sparsity" not in rep.activation


def test_dense_student_reports_no_activation(tmp_path):
    tok = tiny_tokenizer(320)
    teacher = tiny_model("llama", seed=0, vocab_size=len(tok))
    txt = tmp_path / "train.txt"
    txt.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    cfg = RecoverConfig(data=str(txt), tokens=64, seqlen=16, batch_size=2, grad_accum=2, val_windows=4,
                        teacher_dtype="float32")
    assert recover(copy.deepcopy(teacher), teacher, tok, cfg).activation is None


def test_the_pipeline_saves_and_reports_the_recalibrated_thresholds(tiny_folder, prose_file, tmp_path):
    """RunSpec(activation=..., recover=...): the thresholds calibrated before training are re-calibrated after it;
    the saved side files and report.extra['activation'] are the new ones, not the pre-training ones."""
    from prunekit.pipeline import RunSpec, run

    calib = CalibConfig(str(prose_file), nsamples=2, seqlen=16)
    rec = RecoverConfig(data=str(prose_file), tokens=64, seqlen=16, batch_size=2, grad_accum=2, val_windows=2,
                        lr=3e-2, teacher_dtype="float32")
    res = run(RunSpec(str(tiny_folder), activation=ActivationSparsityConfig(sparsity=0.4, calib=calib), recover=rec,
                      out=tmp_path / "out", eval_datasets=(str(prose_file),), eval_seqlen=32, max_windows=2))
    act = res.report.extra["recover"]["activation"]
    assert act["recalibrated"] and act["sparsity"] == pytest.approx(0.4, abs=0.05)
    loaded, _ = prunekit.load_model(str(res.saved))
    state = state_of(loaded)
    assert res.report.extra["activation"]["mean_sparsity"] == act["sparsity"]
    assert all(torch.equal(state.thresholds[n], state_of(res.model).thresholds[n].float()) for n in state.sites)


def test_an_unreadable_calibration_text_fails_before_training(tmp_path, data_dir, monkeypatch):
    """Re-calibration needs the thresholds' calibration text: it is read before the first step, not after."""
    from prunekit.recover.trainer import Trainer

    tok, teacher, student, state, cfg = _setup(tmp_path, data_dir)
    state.config["calib"] = {**state.config["calib"], "dataset": str(tmp_path / "gone.txt")}
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail("training started"))
    with pytest.raises(Exception, match="gone.txt"):
        recover(student, teacher, tok, cfg, data_dir=data_dir)


def test_lora_on_thresholded_linear_inputs_is_refused_before_training(tmp_path, data_dir, monkeypatch):
    """peft wraps each linear: the adapters would see the unthresholded input while the base sees the masked one."""
    import dataclasses

    from prunekit.errors import ConfigError
    from prunekit.recover.trainer import Trainer

    tok, teacher, student, state, cfg = _setup(tmp_path, data_dir)
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail("training started"))
    with pytest.raises(ConfigError, match="use --trainable full"):
        recover(student, teacher, tok, dataclasses.replace(cfg, trainable="lora"), data_dir=data_dir)
