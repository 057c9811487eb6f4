"""Low-rank compression: exact SVD maths, WeLore's threshold, SVD-LLM whitening, save/reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_model, tiny_tokenizer
from prunekit.calibration import run_sequential
from prunekit.methods import Target, build_method
from prunekit.methods import welore as welore_mod
from prunekit.methods.base import InputStats
from prunekit.methods.lowrank import max_saving_rank, normalized_singular_values, rank_for, saves_params, tail_energy
from prunekit.methods.svd_llm import whitened_truncation
from prunekit.methods.welore import find_tau, reduction
from prunekit.models import decoder_linears
from prunekit.models.lowrank import LowRankLinear, lowrank_modules


def _linear(m=40, n=30, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias)
    return lin


@pytest.mark.parametrize("factorize", ["auto", "never"])
def test_svd_error_is_tail_energy(factorize):
    lin = _linear(40, 30)
    w = lin.weight.detach().clone()
    s = torch.linalg.svdvals(w.double())
    res = build_method("svd", {"factorize": factorize}).compress("layer", lin, None, Target(0.6))
    k = 12  # round(30 * 0.4)
    new_w = res.module.merged_weight() if res.module is not None else lin.weight.detach()
    rel = float((w - new_w).double().square().sum() / w.double().square().sum())
    tail = float(s[k:].square().sum() / s.square().sum())
    assert res.info["rank"] == k and rel == pytest.approx(tail, rel=1e-4)
    assert res.error == pytest.approx(tail, rel=1e-4) and tail_energy(s, k) == pytest.approx(tail, rel=1e-9)
    assert isinstance(res.module, LowRankLinear) == (factorize == "auto")  # 12*(70) < 1200 saves params
    assert torch.linalg.matrix_rank(new_w.double(), rtol=1e-5) == k


def test_lowrank_linear_matches_truncated_product_exactly():
    lin = _linear(24, 16)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    res = build_method("svd").compress("layer", lin, None, Target(0.5))
    mod = res.module
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    trunc = u[:, :8] @ torch.diag(s[:8]) @ vh[:8]
    x = torch.randn(5, 7, 16)
    assert torch.allclose(mod.merged_weight(), trunc, atol=1e-5)
    assert torch.allclose(mod(x), x @ trunc.T + b, atol=1e-5)
    assert torch.equal(mod(x), nn.functional.linear(nn.functional.linear(x, mod.down.weight), mod.up.weight, mod.up.bias))
    assert mod.nonzero_params() == 8 * (24 + 16) and mod.to_linear()(x).allclose(mod(x), atol=1e-5)


def test_rank_budget_and_saving_rule():
    assert rank_for(0.5, 100, 60) == 30 and rank_for(0.5, 100, 60, "params") == 18  # 0.5*6000/160 = 18.75
    assert saves_params(max_saving_rank(576, 576), 576, 576) and not saves_params(288, 576, 576)
    assert max_saving_rank(1536, 576) == 418
    v = normalized_singular_values(torch.tensor([4.0, 2.0, 1.0]))
    assert torch.allclose(v, torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("objective", ["rank", "params"])
@pytest.mark.parametrize("goal", [0.1, 0.3, 0.5])
def test_tau_search_meets_the_requested_reduction(objective, goal):
    g = torch.Generator().manual_seed(1)
    shapes = [(64, 48), (48, 48), (128, 48), (16, 48)]
    norm = [normalized_singular_values(torch.rand(min(s), generator=g, dtype=torch.float64).pow(3).sort(descending=True).values)
            for s in shapes]
    tau = find_tau(norm, shapes, goal, objective)
    assert reduction(norm, shapes, tau, objective) >= goal
    assert reduction(norm, shapes, tau - 1e-9, objective) < goal  # smallest such tau
    with pytest.raises(ValueError, match="cannot remove"):
        find_tau(norm, shapes, 0.999, objective)


def test_welore_through_the_engine(calib_ids, monkeypatch):
    model = tiny_model()
    calls = []
    real = welore_mod.svd_fp32
    monkeypatch.setattr(welore_mod, "svd_fp32", lambda w: calls.append(1) or real(w))
    linears = decoder_linears(model)
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    method = build_method("welore")
    report = run_sequential(model, None, method, {n: Target(0.5) for n in linears})
    assert len(calls) == len(linears)  # one SVD per matrix, all in prepare()
    assert method.summary()["rank_reduction"] >= 0.5
    removed = sum(r.info["full_rank"] - r.info["rank_thresholded"] for r in report.layers)
    assert removed / sum(r.info["full_rank"] for r in report.layers) == pytest.approx(method.summary()["rank_reduction"])
    after = decoder_linears(model)
    mods = dict(model.named_modules())
    for r in report.layers:
        if r.info["lowrank"]:
            assert isinstance(mods[r.name], LowRankLinear) and r.info["params_after"] < r.info["params_before"]
            assert r.sparsity == pytest.approx(1 - r.info["params_after"] / r.params)
        else:
            assert torch.equal(after[r.name].weight, dense[r.name])  # N-LRCs stay dense and untouched
    assert any(r.info["lowrank"] for r in report.layers)


def test_svd_llm_output_error_is_exact_and_beats_plain_svd():
    torch.manual_seed(0)
    n, m, k = 32, 24, 8
    x = torch.randn(2000, n) @ (torch.randn(n, n) * torch.linspace(0.05, 2.0, n))  # correlated, anisotropic
    w = torch.randn(m, n)
    h = x.T @ x
    a, b, info = whitened_truncation(w, h, k)
    y, y2 = x @ w.T, x @ (b @ a).T
    rel = float((y - y2).double().square().sum() / y.double().square().sum())
    assert info["error"] == pytest.approx(rel, rel=1e-3)
    u, s, vh = torch.linalg.svd(x @ w.T, full_matrices=False)  # ||W L||: output spectrum
    assert rel == pytest.approx(float(s[k:].square().sum() / s.square().sum()), rel=1e-3)
    lin = nn.Linear(n, m, bias=False)
    lin.weight.data.copy_(w)
    plain = build_method("svd").compress("layer", lin, None, Target(1 - k / m)).module
    rel_plain = float((y - plain(x).detach()).double().square().sum() / y.double().square().sum())
    assert rel < rel_plain
    st = InputStats(n, torch.device("cpu"), hessian=True)
    st.update(x)
    lin2 = nn.Linear(n, m, bias=False)
    lin2.weight.data.copy_(w)
    res = build_method("svd-llm").compress("layer", lin2, st, Target(1 - k / m))
    assert res.error == pytest.approx(rel, rel=1e-3) and res.info["rank"] == k


def test_svd_llm_through_the_engine(tiny_llama, calib_ids):
    linears = decoder_linears(tiny_llama)
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    xs = {n: [] for n in linears if ".layers.0." in n}  # block 0 sees the dense model's inputs
    hooks = [linears[n].register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n in xs]
    with torch.no_grad():
        tiny_llama(input_ids=calib_ids, use_cache=False)
    for h in hooks:
        h.remove()
    report = run_sequential(tiny_llama, calib_ids, build_method("svd-llm"), {n: Target(0.6) for n in linears})
    assert len(lowrank_modules(tiny_llama)) == 14
    mods = dict(tiny_llama.named_modules())
    for r in report.layers:
        if r.name in xs:  # the reported error is the relative output error on the calibration inputs
            x = torch.cat(xs[r.name]).double()
            w, w2 = dense[r.name].double(), mods[r.name].merged_weight().double()
            want = float(((w - w2) @ x.t()).square().sum() / (w @ x.t()).square().sum())
            assert r.error == pytest.approx(want, rel=1e-3), r.name
    assert torch.isfinite(tiny_llama(calib_ids[:1]).logits).all()


@pytest.fixture
def lowrank_tiny(calib_ids):
    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=True)
    run_sequential(model, None, build_method("welore"), {n: Target(0.5) for n in decoder_linears(model)})
    assert lowrank_modules(model)
    return model, tok


def test_saved_lowrank_model_reloads_and_reproduces_outputs(lowrank_tiny, tmp_path, calib_ids):
    from transformers import AutoModelForCausalLM

    import prunekit
    from prunekit.formats import save_compressed

    model, tok = lowrank_tiny
    ids = calib_ids[:2]
    ref = model(ids).logits
    out, how = save_compressed(model, tok, tmp_path / "lr", {"note": "test"})
    assert "prunekit.load_model" in how and (out / "prunekit_lowrank.json").is_file()
    back, _ = prunekit.load_model(str(out))
    assert {n: m.rank for n, m in lowrank_modules(back).items()} == {n: m.rank for n, m in lowrank_modules(model).items()}
    assert torch.equal(back(ids).logits, ref)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # still tied
    with pytest.raises(OSError):  # plain transformers must refuse, not silently re-initialise
        AutoModelForCausalLM.from_pretrained(out)
    merged, how = save_compressed(model, tok, tmp_path / "merged", merge=True)
    assert "AutoModelForCausalLM" in how and not lowrank_modules(model)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert torch.allclose(plain(ids).logits, ref, atol=1e-4)


def test_cli_export_merges(lowrank_tiny, tmp_path, calib_ids):
    from transformers import AutoModelForCausalLM

    from prunekit.cli import main
    from prunekit.formats.lowrank import save_lowrank

    model, tok = lowrank_tiny
    src = save_lowrank(model, tok, tmp_path / "lr")
    assert main(["export", str(src), "--out", str(tmp_path / "dense"), "--merge-lowrank"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert torch.allclose(plain(calib_ids[:1]).logits, model(calib_ids[:1]).logits, atol=1e-4)
    assert main(["export", str(src), "--out", str(tmp_path / "dense")]) == 2  # exists: one-line error


@pytest.mark.parametrize("n_lrc", ["dense", "truncate"])
def test_welore_summary_reports_the_rank_actually_removed(n_lrc):
    """``rank_reduction`` counts every rank below tau (what tau is tuned on, as in the reference); with the
    default ``n_lrc=dense`` the N-LRCs keep their ranks, so the summary must also say how much was removed."""
    model = tiny_model()
    linears = decoder_linears(model)
    method = build_method("welore", {"n_lrc": n_lrc})
    report = run_sequential(model, None, method, {n: Target(0.5) for n in linears})
    full = sum(r.info["full_rank"] for r in report.layers)
    removed = sum(r.info["full_rank"] - r.info["rank"] for r in report.layers)  # what the model now holds
    s = method.summary()
    assert s["rank_reduction_applied"] == pytest.approx(removed / full)
    assert s["lrc_matrices"] == sum(bool(r.info["lowrank"]) for r in report.layers) == len(lowrank_modules(model))
    if n_lrc == "dense":
        assert any(r.info.get("n_lrc") for r in report.layers)  # the case that makes the two differ
        assert s["rank_reduction_applied"] < s["rank_reduction"]
    else:
        assert s["rank_reduction_applied"] == pytest.approx(s["rank_reduction"])
