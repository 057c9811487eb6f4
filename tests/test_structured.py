"""Structured pruning: exact shapes, exact equivalences, the OBS/bias-compensation maths, GQA validity,
the block criteria against direct computations, and one-line errors before any work."""

import pytest
import torch

from conftest import rand_ids, tiny_model
from prunekit import PruneConfig, prune
from prunekit.errors import ConfigError
from prunekit.methods.base import InputStats
from prunekit.models import decoder_linears, find_blocks, weight_view
from prunekit.models.shrink import drop_blocks, remove_channels, remove_heads
from prunekit.models.structure import block_parts
from prunekit.structured import obs
from prunekit.structured.criteria.flap import FLAP
from prunekit.structured.criteria.slimgpt import SlimGPT
from prunekit.structured.passes import block_influence, removal_nll

ARCHS = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "opt", "gpt2", "gpt_neox"]


def arch_model(arch: str, seed: int = 0, **over):
    """The conftest tiny models, plus Gemma-2/3-style mixed sliding/full attention (4 blocks)."""
    if not arch.startswith("gemma"):
        return tiny_model(arch, seed, **over)
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=256)
    if arch == "gemma2":
        cfg = Gemma2Config(**{**base, **over})
    else:
        types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        cfg = Gemma3TextConfig(**{**base, "layer_types": types, **over})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n=6, seqlen=32, vocab=128):
    return rand_ids(n, seqlen, vocab=vocab)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- exact shapes and plans

def test_width_uniform_exact_shapes_and_params():
    """hidden 64, 4 heads / 2 kv (head_dim 16), FFN 128: a block holds 36,864 weights. At 25% the
    attention gets one level (one query head per group = 4,096 weights) and the rest, 5,120, is
    round(5120 / (192 * 8)) = 3 runs of 8 channels: 4,096 + 4,608 = 8,704 per block."""
    model = tiny_model("llama")
    dense = sum(p.numel() for p in model.parameters())
    cfg = PruneConfig(method="wanda", pattern="width", sparsity=0.25, method_options={"multiple": 8})
    report = prune(model, cfg, calib=_ids())
    for i in range(2):
        a, m = model.model.layers[i].self_attn, model.model.layers[i].mlp
        assert tuple(a.q_proj.weight.shape) == (32, 64) and tuple(a.o_proj.weight.shape) == (64, 32)
        assert tuple(a.k_proj.weight.shape) == (32, 64) and tuple(a.v_proj.weight.shape) == (32, 64)
        assert a.num_key_value_groups == 1
        assert tuple(m.gate_proj.weight.shape) == (104, 64) and tuple(m.down_proj.weight.shape) == (64, 104)
    st = report.extra["structure"]
    assert st["params_dense"] - st["params"] == 2 * 8704 == dense - sum(p.numel() for p in model.parameters())
    assert report.sparsity == pytest.approx(8704 / 36864)
    assert st["uniform_widths"]


def test_channels_only_and_heads_only_touch_their_part():
    model = tiny_model("llama")
    prune(model, PruneConfig(method="magnitude", pattern="channels", sparsity=0.25, method_options={"multiple": 8}))
    assert all(b.attn.heads == 4 for b in block_parts(model))
    model = tiny_model("llama")
    prune(model, PruneConfig(method="magnitude", pattern="heads", sparsity=0.1))
    assert all(b.ffn.width == 128 and b.attn.heads == 2 for b in block_parts(model))


def test_nonuniform_allocation_meets_target_within_one_multiple():
    model = tiny_model("llama", num_hidden_layers=4)
    report = prune(model, PruneConfig(method="wanda", pattern="width", sparsity=0.3, allocation="owl",
                                      method_options={"multiple": 8}), calib=_ids())
    removed = sum(r.sparsity * r.params for r in report.layers)
    assert abs(removed - 0.3 * report.params) <= 8 * 192  # one channel run
    report = prune(tiny_model("llama", num_hidden_layers=4), PruneConfig(
        method="flap", pattern="width", sparsity=0.3, allocation="global", method_options={"multiple": 8}),
        calib=_ids())
    assert abs(sum(r.sparsity * r.params for r in report.layers) - 0.3 * report.params) <= 8 * 192


# ---------------------------------------------------------------- exact equivalences

@pytest.mark.parametrize("arch", ARCHS)
def test_removing_zero_structures_leaves_outputs_unchanged(arch):
    """Zero a head (its q/k/v rows and output columns) and some channels, then remove them physically."""
    model = arch_model(arch)
    ids = _ids(2)
    parts = block_parts(model)
    for bp in parts:
        a, f = bp.attn, bp.ffn
        get = model.get_submodule
        h = 1 if a.group_size == 1 else a.group_size - 1  # a whole group (MHA) or one query head per group
        heads = [h] if a.group_size == 1 else [g * a.group_size + a.group_size - 1 for g in range(a.kv_heads)]
        for hd in heads:
            weight_view(get(a.q))[a.q_rows(hd)] = 0
            weight_view(get(a.o))[:, a.o_cols(hd)] = 0
        for k in (3, 7, 20):
            for n in f.inputs:
                weight_view(get(n))[k] = 0
            weight_view(get(f.output))[:, k] = 0
    ref = _logits(model, ids)
    for bp in parts:
        a = bp.attn
        if a.group_size == 1:
            remove_heads(model, a, [1], [1])
        else:
            remove_heads(model, a, [g * a.group_size + a.group_size - 1 for g in range(a.kv_heads)])
        remove_channels(model, bp.ffn, [3, 7, 20])
    assert all(b.ffn.width == b0.ffn.width - 3 for b, b0 in zip(block_parts(model), parts))
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "gpt2"])
def test_pruned_model_equals_its_masked_engine_state(arch):
    """The engine prunes by zeroing; the physically smaller model must compute the same logits."""
    model = arch_model(arch)
    ids = _ids(2)
    got = {}
    from prunekit.structured import prune as sp

    real = sp.remove_heads

    def spy(m, *a, **k):  # logits of the zeroed (masked) model, just before the first physical removal
        if "masked" not in got:
            got["masked"] = _logits(m, ids)
        return real(m, *a, **k)

    sp.remove_heads = spy
    try:
        prune(model, PruneConfig(method="flap", pattern="width", sparsity=0.3, method_options={"multiple": 8}),
              calib=_ids())
    finally:
        sp.remove_heads = real
    torch.testing.assert_close(_logits(model, ids), got["masked"], atol=1e-5, rtol=1e-5)


def test_flap_bias_compensation_is_exact_when_removed_inputs_are_constant():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 10, generator=g)
    x[:, [2, 5, 7]] = torch.tensor([0.3, -1.2, 2.0])  # the removed features never move
    w, b = torch.randn(4, 10, generator=g), torch.randn(4, generator=g)
    st = InputStats(10, torch.device("cpu"), moments=True)
    st.update(x.unsqueeze(0))
    removed = torch.zeros(10, dtype=torch.bool)
    removed[[2, 5, 7]] = True
    w2, b2 = FLAP().compensate(w, b, removed, st)
    assert (w2[:, removed] == 0).all()
    torch.testing.assert_close(x @ w2.t() + b2, x @ w.t() + b, atol=1e-5, rtol=1e-5)
    w3, b3 = FLAP().compensate(w, None, removed, st)  # no bias before: one is created
    torch.testing.assert_close(x @ w3.t() + b3, x @ w.t(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- SlimGPT / OBS

def _system(seed=0, n=300, d=12, out=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x += 0.5  # a mean, so the bias refit has something to do
    return x, torch.randn(out, d, generator=g, dtype=torch.float64)


def test_obs_update_equals_least_squares_and_error_formula_is_exact():
    x, w = _system()
    removed = torch.zeros(12, dtype=torch.bool)
    removed[[1, 4, 5, 9]] = True
    hinv = obs.inverse(x.t() @ x)
    new = obs.obs_update(w, hinv, removed)
    keep = ~removed
    ls = torch.linalg.lstsq(x[:, keep], x @ w.t()).solution.t()  # argmin ||X W^T - X_K W_K'^T||
    torch.testing.assert_close(new[:, keep], ls, atol=1e-9, rtol=1e-9)
    assert (new[:, removed] == 0).all()
    err = float(((x @ (w - new).t()) ** 2).sum())
    assert obs.group_error(w, hinv, torch.nonzero(removed).flatten()) == pytest.approx(err, rel=1e-9)


def test_obs_with_constant_feature_refits_the_bias_as_least_squares():
    x, w = _system(1)
    st = InputStats(12, torch.device("cpu"), hessian=True, moments=True)
    st.update(x.float().unsqueeze(0))
    removed = torch.zeros(12, dtype=torch.bool)
    removed[[0, 3, 8]] = True
    w2, b2 = SlimGPT(SlimGPT.Options(percdamp=0.0, bias=True)).compensate(w.float(), None, removed, st)
    xk = torch.cat([x[:, ~removed], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    ls = torch.linalg.lstsq(xk, x @ w.t()).solution.t()
    torch.testing.assert_close(w2[:, ~removed].double(), ls[:, :-1], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(b2.double(), ls[:, -1], atol=2e-4, rtol=2e-4)


def test_greedy_selection_downdate_matches_reinversion():
    x, w = _system(2)
    h = x.t() @ x
    hinv = obs.inverse(h)
    cols = torch.tensor([2, 6])
    keep = torch.tensor([i for i in range(12) if i not in (2, 6)])
    down = obs.downdate(hinv, cols)
    torch.testing.assert_close(down[keep][:, keep], torch.linalg.inv(h[keep][:, keep]), atol=1e-9, rtol=1e-7)
    mask = obs.greedy_columns(w, hinv, 4, rounds=4)  # exact greedy: one column per round
    chosen = []
    for _ in range(4):
        left = torch.tensor([i for i in range(12) if i not in chosen])
        errs = {int(j): obs.group_error(obs.obs_update(w, hinv, _mask(chosen, 12)), obs.downdate(hinv, torch.tensor(
            chosen, dtype=torch.long)) if chosen else hinv, torch.tensor([int(j)])) for j in left}
        chosen.append(min(errs, key=errs.get))
    assert sorted(chosen) == torch.nonzero(mask).flatten().tolist()


def _mask(idx, n):
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m


# ---------------------------------------------------------------- grouped-query attention

@pytest.mark.parametrize("gqa,heads,kv", [("heads", 6, 2), ("groups", 4, 1)])
def test_gqa_stays_valid(gqa, heads, kv):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    report = prune(model, PruneConfig(method="slimgpt", pattern="heads", sparsity=0.05 if gqa == "heads" else 0.1,
                                      method_options={"gqa": gqa}), calib=_ids())
    for bp in block_parts(model):
        assert (bp.attn.heads, bp.attn.kv_heads) == (heads, kv)
        assert model.get_submodule(bp.attn.module).num_key_value_groups == heads // kv
    assert torch.isfinite(_logits(model, _ids(1))).all()
    assert report.extra["structure"]["uniform_widths"]


def test_uneven_groups_are_refused():
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ConfigError, match="uneven"):
        remove_heads(model, block_parts(model)[0].attn, [0])


# ---------------------------------------------------------------- block criteria

@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
def test_block_influence_equals_direct_cosines(arch):
    model = arch_model(arch)
    ids = _ids()
    bi = block_influence(model, ids, "blocks", batch_size=4)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = len(find_blocks(model)[1])
    for i in range(n - 1):  # the last hidden state is after the final norm
        cos = torch.nn.functional.cosine_similarity(hs[i].reshape(-1, hs[i].shape[-1]),
                                                    hs[i + 1].reshape(-1, hs[i].shape[-1]), dim=-1)
        assert bi[i] == pytest.approx(1 - float(cos.double().mean()), abs=1e-6)


@pytest.mark.parametrize("kind", ["blocks", "ffn"])
def test_removal_nll_equals_the_nll_of_the_model_without_it(kind):
    model = arch_model("gemma3")
    ids = _ids(3)
    dense, nll = removal_nll(model, ids, kind, [0, 2, 3])
    for i in (0, 2, 3):
        m = arch_model("gemma3")
        if kind == "blocks":
            drop_blocks(m, [i])
        else:
            remove_channels(m, block_parts(m)[i].ffn, range(128))
        with torch.no_grad():
            want = sum(float(m(input_ids=ids[b:b + 1], labels=ids[b:b + 1]).loss) for b in range(3)) / 3
        assert nll[i] == pytest.approx(want, rel=1e-5)


def test_blocks_pattern_removes_the_lowest_ranked_and_keeps_layer_types():
    model = arch_model("gemma3")
    bi = block_influence(model, _ids(), "blocks")
    report = prune(model, PruneConfig(method="shortgpt", pattern="blocks", sparsity=0.25), calib=_ids())
    gone = report.extra["method_summary"]["removed"]
    assert gone == [min(range(4), key=lambda i: bi[i])]
    kept = [i for i in range(4) if i not in gone]
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert model.config.num_hidden_layers == 3 and model.config.layer_types == [types[i] for i in kept]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    assert torch.isfinite(_logits(model, _ids(1))).all()


# ---------------------------------------------------------------- errors before any work

@pytest.mark.parametrize("kwargs,match", [
    (dict(method="sparsegpt", pattern="channels"), "prunes single weights.*use one of flap"),
    (dict(method="shortgpt", pattern="width"), "cannot serve pattern width"),
    (dict(method="flap", pattern="blocks"), "cannot serve pattern blocks"),
    (dict(method="wanda", pattern="unstructured", allocation="global"), "structured --pattern"),
    (dict(pattern="channels", refine="dsnot"), "unstructured masks"),
    (dict(pattern="width", sparsity=None), "sparsity is required"),
])
def test_bad_combinations_fail_with_one_line(kwargs, match):
    from prunekit.api import build_components

    with pytest.raises(ConfigError, match=match) as e:
        build_components(PruneConfig(**kwargs))
    assert "\n" not in str(e.value)


def test_default_criteria():
    assert PruneConfig(pattern="width").method == "slimgpt"
    assert PruneConfig(pattern="heads").method == "slimgpt"
    assert PruneConfig(pattern="channels").method == "slimgpt"
    assert PruneConfig(pattern="blocks").method == "shortgpt"
    assert PruneConfig().method == "wanda"


@pytest.mark.parametrize("kwargs,match", [
    (dict(pattern="heads", sparsity=0.5), "hold at most"),
    (dict(pattern="width", sparsity=0.3, exclude=("down_proj",)), "leave out"),
    (dict(pattern="blocks", sparsity=0.3, allocation="owl"), "use --allocation uniform"),
])
def test_impossible_requests_fail_before_any_work(kwargs, match):
    model = tiny_model("llama")
    before = {n: weight_view(m).clone() for n, m in decoder_linears(model).items()}
    with pytest.raises(ConfigError, match=match) as e:
        prune(model, PruneConfig(**kwargs), calib=_ids())
    assert "\n" not in str(e.value)
    assert all(torch.equal(weight_view(m), before[n]) for n, m in decoder_linears(model).items())


def test_architecture_without_a_recognisable_ffn_fails_in_one_line():
    """Phi-3 fuses gate and up into one projection: channels cannot apply; blocks still can."""
    from transformers import AutoModelForCausalLM, Phi3Config

    cfg = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ConfigError, match="Phi3ForCausalLM: block 0 has no FFN whose channels") as e:
        prune(model, PruneConfig(method="magnitude", pattern="channels", sparsity=0.2))
    assert "\n" not in str(e.value) and "--pattern blocks" in str(e.value)
    prune(model, PruneConfig(pattern="blocks", sparsity=0.5), calib=_ids())
    assert len(find_blocks(model)[1]) == 1


def test_block_scores_are_cached_by_model_and_calibration_content(tmp_path, monkeypatch):
    from prunekit.structured.cache import cached_scores

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    model, ids, calls = tiny_model("llama"), _ids(), []
    compute = lambda: calls.append(1) or {"x": len(calls)}  # noqa: E731
    assert cached_scores(model, ids, "t", compute) == {"x": 1}
    assert cached_scores(model, ids, "t", compute) == {"x": 1} and len(calls) == 1
    assert cached_scores(model, ids[:3], "t", compute) == {"x": 2}  # other tokens
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    assert cached_scores(model, ids, "t", compute) == {"x": 3}  # another weight


def test_dropped_ffn_with_bias_compensation_is_exact_when_its_output_is_constant():
    """OPT's fc2 has a bias: with fc2's weights zero the FFN adds a constant, which bias=true keeps."""
    ids = _ids()
    for bias, exact in ((True, True), (False, False)):
        model = arch_model("opt")
        with torch.no_grad():
            for layer in model.model.decoder.layers:
                layer.fc2.weight.zero_()
                layer.fc2.bias.normal_()
        ref = _logits(model, ids[:2])
        prune(model, PruneConfig(method="shortgpt", pattern="ffn", sparsity=0.25, method_options={"bias": bias}),
              calib=ids)
        assert sum(b.ffn.width == 0 for b in block_parts(model)) == 1
        assert torch.allclose(_logits(model, ids[:2]), ref, atol=1e-5) == exact


def test_ffn_bias_compensation_refuses_a_post_ffn_norm():
    with pytest.raises(ConfigError, match="post_feedforward_layernorm"):
        prune(arch_model("gemma2"), PruneConfig(method="shortgpt", pattern="ffn", sparsity=0.2,
                                                method_options={"bias": True}), calib=_ids())
