"""Recovery: masks kept exactly, resume bit for bit, exact objectives and optimizer steps."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit.errors import ConfigError
from prunekit.masks import is_nm_sparse, nm_mask
from prunekit.models import decoder_linears
from prunekit.recover import RecoverConfig, recover
from prunekit.recover.data import TrainingText, batch_indices, pack_windows
from prunekit.recover.masks import MaskSet, sparsity_stats
from prunekit.recover.objectives import Objective, kl_sum
from prunekit.recover.optim import build_optimizer, lr_lambda, state_bytes
from prunekit.recover.spam import SPAM, warmup_factor
from prunekit.recover.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

VOCAB = 128


def pruned_pair(seed: int = 0, vocab: int = VOCAB):
    """(teacher, student): the student is the teacher with 50% per-row magnitude pruning, and its
    first MLP down-projection 2:4."""
    teacher = tiny_model("llama", seed=seed, vocab_size=vocab)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, mod in decoder_linears(student).items():
            w = mod.weight
            if name.endswith("layers.0.mlp.down_proj"):
                w.mul_(nm_mask(w.abs(), 2, 4))
            else:
                idx = w.abs().argsort(dim=1)[:, : w.shape[1] // 2]
                w.scatter_(1, idx, 0.0)
    return teacher, student


def text(n: int = 40, seqlen: int = 16, n_val: int = 4, seed: int = 0) -> TrainingText:
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, VOCAB, (n + n_val, seqlen), generator=g)
    return TrainingText("random", "train", windows[:n], windows[n:], windows.numel())


def cfg(**kw) -> RecoverConfig:
    base = dict(tokens=16 * 2 * 2 * 6, seqlen=16, batch_size=2, grad_accum=2, val_windows=4, lr=1e-2,
                ce_weight=0.5, teacher_dtype="float32", warmup_ratio=0.2, loss_chunk=7)
    return RecoverConfig(**{**base, **kw})


def trainer_for(student, teacher, c: RecoverConfig, data: TrainingText, **kw) -> Trainer:
    masks = MaskSet.capture(student)
    named = [(n, p) for n, p in student.named_parameters() if "embed" not in n]
    for n, p in student.named_parameters():
        p.requires_grad_("embed" not in n)
    proj = {f"{n}.weight" for n in decoder_linears(student)}
    return Trainer(Objective(c, student, teacher), data, c, named, masks, proj, **kw)


# -- config and data ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(tokens=0), "tokens=0"), (dict(tokens=-5), "tokens=-5"), (dict(optimizer="sgd"), "optimizer='sgd'"),
    (dict(kl_weight=0.0), "all 0"), (dict(lr=0.0), "lr=0.0"), (dict(trainable="lora", optimizer="galore"), "galore"),
    (dict(temperature=0), "temperature=0"), (dict(warmup_ratio=1.0), "warmup_ratio=1.0"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        RecoverConfig(**kw)


def test_steps_cover_the_budget_and_batches_are_deterministic():
    c = RecoverConfig(tokens=1000, seqlen=100, batch_size=2, grad_accum=3)
    assert c.tokens_per_step == 600 and c.steps == 2
    a = [batch_indices(s, m, c, 7).tolist() for s in range(3) for m in range(3)]
    b = [batch_indices(s, m, c, 7).tolist() for s in range(3) for m in range(3)]
    assert a == b
    seen = sum(a, [])
    assert sorted(seen[:7]) == list(range(7))  # each epoch is a permutation of every window
    assert pack_windows(list(range(10)), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


# -- objectives --------------------------------------------------------------------------------
def test_distillation_is_exactly_zero_when_student_is_teacher():
    z = torch.randn(5, VOCAB)
    assert float(kl_sum(z, z.clone(), 2.0)) == 0.0
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    c = cfg(ce_weight=0.0)
    obj = Objective(c, student, teacher)
    ids = torch.randint(0, VOCAB, (2, 16))
    parts = obj.forward_backward(ids)
    assert parts["kl"] == 0.0 and parts["loss"] == 0.0
    assert obj.evaluate(ids)["kl"] == 0.0
    assert float(kl_sum(z, z + torch.randn_like(z))) > 0


def test_chunked_loss_gives_the_full_loss_gradient():
    """The trunk/head split with per-chunk backward equals one backward through full logits."""
    teacher, s1 = pruned_pair()
    s2 = copy.deepcopy(s1)
    ids = torch.randint(0, VOCAB, (2, 16))
    chunked = Objective(cfg(loss_chunk=5, hidden_weight=0.3), s1, teacher)
    assert chunked.chunked  # Llama's logits are lm_head(last hidden state): the memory-bounded path
    got = chunked.forward_backward(ids)
    obj = Objective(cfg(loss_chunk=5, hidden_weight=0.3), s2, teacher)
    obj.chunked = False  # the reference path: full logits, one backward
    want = obj.forward_backward(ids)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for (n, p1), (_, p2) in zip(s1.named_parameters(), s2.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=n)


# -- masks kept --------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["adamw", "spam", "galore"])
def test_full_training_keeps_every_pruned_weight_zero(optimizer):
    if optimizer == "galore":
        pytest.importorskip("galore_torch")
    teacher, student = pruned_pair()
    before = {n: (m.weight == 0).clone() for n, m in decoder_linears(student).items()}
    w0 = {n: m.weight.detach().clone() for n, m in decoder_linears(student).items()}
    c = cfg(optimizer=optimizer, galore_rank=8, galore_update_gap=2, spam_clip_delay=1, spam_reset_interval=3,
            spam_warmup=2)
    tr = trainer_for(student, teacher, c, text())
    tr.run()
    for n, m in decoder_linears(student).items():
        assert torch.equal(m.weight == 0, before[n]), n  # same zeros: none lost, none added
        assert not torch.equal(m.weight, w0[n]), n  # and the kept weights did train
        for k, v in tr.opt.state[m.weight].items():
            if isinstance(v, torch.Tensor) and v.shape == m.weight.shape:
                assert not v[before[n]].any(), (n, k)  # moments at pruned positions stay zero
    down = decoder_linears(student)["model.layers.0.mlp.down_proj"].weight
    assert is_nm_sparse(down, 2, 4)


def test_recover_api_reports_identical_sparsity(tmp_path):
    tok = tiny_tokenizer(320)
    teacher, student = pruned_pair(vocab=len(tok))
    txt = tmp_path / "train.txt"
    txt.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    calls = []
    rep = recover(student, teacher, tok, cfg(data=str(txt)), evaluate=lambda m: calls.append(1) or {"n": len(calls)})
    assert rep.masks_kept and rep.sparsity_before == rep.sparsity_after
    assert rep.sparsity_before["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rep.steps == 6 and rep.tokens == 6 * 64 and rep.optimizer_state_bytes > 0
    assert set(rep.evaluation) == {"before", "after"}
    assert rep.validation_after["kl"] < rep.validation_before["kl"] or rep.validation_after["ce"] < rep.validation_before["ce"]


def test_lora_merge_through_the_mask_keeps_sparsity():
    pytest.importorskip("peft")
    from prunekit.recover.lora import add_lora, merge_lora

    teacher, student = pruned_pair()
    before = {n: (m.weight == 0).clone() for n, m in decoder_linears(student).items()}
    c = cfg(trainable="lora", lora_rank=4, lr=5e-2)
    masks = MaskSet.capture(student)
    torch.manual_seed(0)
    named = add_lora(student, list(before), c)
    tr = Trainer(Objective(c, student, teacher), text(), c, named, masks)
    tr.run()
    plain = copy.deepcopy(student)
    info = merge_lora(student, masks, masked=True)
    assert info["layers"] == len(before) and 0 < info["dropped_energy"] < 1
    for n, m in decoder_linears(student).items():
        assert torch.equal(m.weight == 0, before[n]), n
    merge_lora(plain, MaskSet(), masked=False)
    assert sparsity_stats(plain)["sparsity"] < 0.01  # an unmasked merge fills the pruned positions


# -- resume ------------------------------------------------------------------------------------
class Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer, trainable", [("adamw", "full"), ("spam", "full"), ("galore", "full"),
                                                  ("adamw", "lora")])
def test_resume_after_interruption_is_bit_identical(tmp_path, optimizer, trainable):
    if optimizer == "galore":
        pytest.importorskip("galore_torch")
    if trainable == "lora":
        pytest.importorskip("peft")
    c = cfg(optimizer=optimizer, trainable=trainable, checkpoint_every=2, galore_rank=8, galore_update_gap=3,
            spam_reset_interval=3, spam_warmup=2, spam_clip_delay=1, lora_dropout=0.1 if trainable == "lora" else 0.0)

    def fresh():
        teacher, student = pruned_pair()
        if trainable == "lora":
            from prunekit.recover.lora import add_lora

            masks = MaskSet.capture(student)
            torch.manual_seed(0)
            named = add_lora(student, list(decoder_linears(student)), c)
            return Trainer(Objective(c, student, teacher), text(), c, named, masks,
                           checkpoint_dir=tmp_path / "ck", callback=stop)
        return trainer_for(student, teacher, c, text(), checkpoint_dir=tmp_path / "ck", callback=stop)

    def stop(info):
        if info.step == 5 and stop.armed:
            raise Interrupt

    stop.armed = False
    ref = fresh()  # uninterrupted reference, checkpointing to its own folder
    ref.ckpt_dir = tmp_path / "ref"
    torch.manual_seed(123)
    ref.run()
    want = {n: p.detach().clone() for n, p in ref.obj.student.named_parameters()}

    stop.armed = True
    interrupted = fresh()
    torch.manual_seed(123)  # the same global random state as the reference (LoRA dropout draws from it)
    with pytest.raises(Interrupt):
        interrupted.run()  # dies after step 5; the last checkpoint is step 4
    stop.armed = False
    torch.manual_seed(999)  # a different global state: the checkpoint must restore it
    resumed = fresh()
    result = resumed.run()
    assert result.resumed_from == 4
    got = dict(resumed.obj.student.named_parameters())
    for n, w in want.items():
        assert torch.equal(got[n], w), n
    assert [h["loss"] for h in result.history] == [h["loss"] for h in ref.history]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    teacher, student = pruned_pair()
    c = cfg(checkpoint_every=1, tokens=64)
    trainer_for(student, teacher, c, text(), checkpoint_dir=tmp_path / "ck").run()
    assert not (tmp_path / "ck" / "state.pt").exists()  # no checkpoint at the very end
    c2 = cfg(checkpoint_every=1)
    tr = trainer_for(*pruned_pair(), c2, text(), checkpoint_dir=tmp_path / "ck", callback=_raise_at(2))
    with pytest.raises(Interrupt):
        tr.run()
    with pytest.raises(ConfigError, match="another run.*lr="):
        trainer_for(*pruned_pair(), cfg(checkpoint_every=1, lr=0.5), text(), checkpoint_dir=tmp_path / "ck").run()


def _raise_at(step):
    def cb(info):
        if info.step == step:
            raise Interrupt
    return cb


# -- optimizers against hand computations ------------------------------------------------------
def test_galore_step_matches_a_hand_computation():
    """W (3 x 2) with G1 = [[3,0],[0,1],[0,0]]: the rank-1 projector is the top right singular
    vector e1 (m >= n: R = G P^T), Adam runs on R (3 x 1), and only column 0 moves."""
    pytest.importorskip("galore_torch")
    lin = torch.nn.Linear(2, 3, bias=False)
    torch.nn.init.zeros_(lin.weight)
    lr, scale, b1, b2, eps = 0.1, 0.5, 0.9, 0.999, 1e-8
    c = RecoverConfig(optimizer="galore", lr=lr, galore_rank=1, galore_update_gap=100, galore_scale=scale,
                      betas=(b1, b2), eps=eps)
    opt = build_optimizer([("w", lin.weight)], c, {"w"})
    lin.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    opt.step()
    s1 = lr * math.sqrt(1 - b2) / (1 - b1)
    w00 = -scale * s1 * (1 - b1) * 3 / (math.sqrt(1 - b2) * 3 + eps)
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[w00, 0.0], [0.0, 0.0], [0.0, 0.0]]))
    # step 2, same projector: G2's column-1 part lies outside span(P) and is not applied
    lin.weight.grad = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 0.0]])
    opt.step()
    r1, r2 = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])
    m = b1 * (1 - b1) * r1 + (1 - b1) * r2
    v = b2 * (1 - b2) * r1**2 + (1 - b2) * r2**2
    s2 = lr * math.sqrt(1 - b2**2) / (1 - b1**2)
    col0 = torch.tensor([w00, 0.0, 0.0]) - scale * s2 * m / (v.sqrt() + eps)
    want = torch.stack([col0, torch.zeros(3)], dim=1)
    torch.testing.assert_close(lin.weight.detach(), want)
    st = opt.state[lin.weight]
    assert st["exp_avg"].shape == (3, 1)  # r x side state, not m x n
    assert state_bytes(opt) == (3 + 3 + 2) * 4  # two 3x1 moments + the 1x2 projector


def test_spam_step_matches_the_paper_rule():
    """Moments, spike clipping (g^2 > theta v -> sign(g) sqrt(theta v)), reset every DeltaT steps and
    the cosine warm-up after it, on a 2-vector with round numbers."""
    p = torch.nn.Parameter(torch.zeros(3))
    b1, b2, th = 0.5, 0.75, 4.0
    opt = SPAM([p], lr=1.0, betas=(b1, b2), eps=1e-12, threshold=th, reset_interval=3, warmup_steps=2, clip_delay=2)
    # t=1: no clipping yet (t % 3 = 1 < clip_delay); plain bias-corrected Adam: m/(sqrt v) = sign(g)
    p.grad = torch.tensor([1.0, -2.0, 0.0])
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-1.0, 1.0, 0.0]))
    # t=2: v = [0.25, 1, 0] -> theta v = [1, 4, 0]; g = [2, 100] are spikes -> [1, 2]; the pruned 0 stays 0
    p.grad = torch.tensor([2.0, 100.0, 0.0])
    opt.step()
    m = torch.tensor([0.5 * 0.5 + 0.5 * 1, 0.5 * -1 + 0.5 * 2, 0.0])
    v = torch.tensor([0.75 * 0.25 + 0.25 * 1, 0.75 * 1 + 0.25 * 4, 0.0])
    step = math.sqrt(1 - b2**2) / (1 - b1**2)
    want = torch.tensor([-1.0, 1.0, 0.0]) - step * m / (v.sqrt() + 1e-12)
    torch.testing.assert_close(p.detach(), want)
    # t=3: reset (3 % 3 == 0): moments restart from zero, update scaled by phi(0) = 0.01
    p.grad = torch.tensor([1.0, 1.0, 0.0])
    opt.step()
    st = opt.state[p]
    torch.testing.assert_close(st["exp_avg"], torch.tensor([0.5, 0.5, 0.0]))
    step3 = math.sqrt(1 - b2**3) / (1 - b1**3)
    want = want - step3 * 0.01 * torch.tensor([1.0, 1.0, 0.0])
    torch.testing.assert_close(p.detach(), want)
    assert st["exp_avg"][2] == 0 and st["exp_avg_sq"][2] == 0
    assert warmup_factor(0, 2) == pytest.approx(0.01)
    assert warmup_factor(1, 2) == pytest.approx(1 - 0.99 * 0.75)
    assert warmup_factor(2, 2) == 1.0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = RecoverConfig(warmup_ratio=0.2, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(c, 10)
    assert [round(f(s), 4) for s in (0, 1)] == [round(1 / 3, 4), round(2 / 3, 4)]
    assert f(2) == 1.0 and f(9) == pytest.approx(0.1)
    lin = lr_lambda(RecoverConfig(warmup_ratio=0.0, schedule="linear", min_lr_ratio=0.0), 5)
    assert [lin(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_low_rank_modules_train_as_they_are():
    """A factorized module has no zeros, so no mask: its two factors train, its rank stays."""
    from prunekit.models import set_module
    from prunekit.models.lowrank import LowRankLinear

    teacher, student = pruned_pair()
    name = "model.layers.1.mlp.up_proj"
    w = teacher.get_submodule(name).weight.detach()
    u, s_, vh = torch.linalg.svd(w, full_matrices=False)
    k = 8
    set_module(student, name, LowRankLinear.from_factors(s_[:k].sqrt()[:, None] * vh[:k], u[:, :k] * s_[:k].sqrt()))
    lr_mod = student.get_submodule(name)
    a0, b0 = lr_mod.down.weight.detach().clone(), lr_mod.up.weight.detach().clone()
    tr = trainer_for(student, teacher, cfg(), text())
    assert not any(n.startswith(name + ".") for n in tr.masks.pruned)
    tr.run()
    assert lr_mod.rank == k and lr_mod.down.weight.shape == a0.shape
    assert not torch.equal(lr_mod.down.weight, a0) and not torch.equal(lr_mod.up.weight, b0)
    assert not tr.masks.violations()


def test_bf16_autocast_trains_float32_weights():
    teacher, student = pruned_pair()
    c = cfg(bf16=True)
    obj = Objective(c, student, teacher)
    parts = obj.forward_backward(torch.randint(0, VOCAB, (2, 16)))
    assert math.isfinite(parts["loss"]) and parts["kl"] > 0
    p = student.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_on_a_cpu_without_bf16_units_is_warned_before_training(monkeypatch, caplog, has_bf16):
    api = importlib.import_module("prunekit.recover.api")
    monkeypatch.setattr(api, "cpu_has_bf16", lambda: has_bf16)
    teacher, student = pruned_pair()
    with caplog.at_level("WARNING", logger="prunekit.recover.api"):
        api.check_models(student, teacher, None, cfg(bf16=True))
    warned = [r for r in caplog.records if "drop --bf16" in r.getMessage()]
    assert len(warned) == (0 if has_bf16 else 1)
