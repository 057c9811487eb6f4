"""Allocators: exact target mean, bounds, the reference formulas on hand-computed toy cases."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit import PruneConfig
from prunekit.errors import ConfigError
from prunekit.allocation import build_allocator, nm_allocation, project_to_mean, weighted_mean
from prunekit.allocation.alpha import alpha_allocation
from prunekit.allocation.owl import dense_input_norms, outlier_ratio, owl_sparsities
from prunekit.allocation import make_targets
from prunekit.masks import Pattern
from prunekit.models import decoder_linears, weight_view


def test_project_to_mean_keeps_valid_input_and_redistributes_clipping():
    p = {"a": 1, "b": 1, "c": 1}
    same = {"a": 0.6, "b": 0.5, "c": 0.4}
    assert project_to_mean(same, p, 0.5) == same
    # a is clipped at 0.99; b and c share the rest: (0.99 + 2 (0.5 + t)) / 3 = 0.7 -> t = 0.055
    out = project_to_mean({"a": 1.2, "b": 0.5, "c": 0.5}, p, 0.7)
    assert out["a"] == pytest.approx(0.99) and out["b"] == pytest.approx(0.555) and out["c"] == pytest.approx(0.555)
    # negative values are lifted to 0, parameter weights respected
    # unclipped: shift t = 0.275 -> 0.075, 0.575; mean (3 * 0.075 + 0.575) / 4 = 0.2
    out = project_to_mean({"a": -0.2, "b": 0.3}, {"a": 3, "b": 1}, 0.2)
    assert out["a"] == pytest.approx(0.075) and out["b"] == pytest.approx(0.575)
    # target 0.1: a would go negative, it is held at 0 and b alone carries 0.4
    out = project_to_mean({"a": -0.2, "b": 0.3}, {"a": 3, "b": 1}, 0.1)
    assert out["a"] == pytest.approx(0.0, abs=1e-9) and out["b"] == pytest.approx(0.4)
    assert weighted_mean(out, {"a": 3, "b": 1}) == pytest.approx(0.1, abs=1e-9)
    with pytest.raises(ValueError, match="outside the per-layer bounds"):
        project_to_mean(same, p, 0.995)


@pytest.mark.parametrize("seed", range(5))
def test_project_to_mean_random_inputs_meet_target_and_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    vals = (torch.rand(40, generator=g) * 1.6 - 0.3).tolist()
    params = (torch.randint(1, 1000, (40,), generator=g)).tolist()
    names = [f"l{i}" for i in range(40)]
    v, p = dict(zip(names, vals)), dict(zip(names, params))
    for target in (0.1, 0.5, 0.9):
        out = project_to_mean(v, p, target)
        assert abs(weighted_mean(out, p) - target) < 1e-6
        assert all(0.0 <= s <= 0.99 for s in out.values())


def test_alpha_allocation_reference_formula():
    metric = {"a": 2.0, "b": 3.0, "c": 4.0}
    params = {"a": 1, "b": 1, "c": 2}
    out = alpha_allocation(metric, params, 0.5, 0.2)
    # r = 0.8, 1.0, 1.2; eta = 0.5 * 4 / (0.8 + 1.0 + 2.4)
    eta = 2.0 / 4.2
    assert out == pytest.approx({"a": 0.8 * eta, "b": eta, "c": 1.2 * eta})
    assert weighted_mean(out, params) == pytest.approx(0.5, abs=1e-12)
    # block-wise: a and b averaged (2.5) vs c (4): r = 0.8, 0.8, 1.2
    out = alpha_allocation(metric, params, 0.5, 0.2, groups={"a": 0, "b": 0, "c": 1})
    eta = 2.0 / (0.8 + 0.8 + 2.4)
    assert out == pytest.approx({"a": 0.8 * eta, "b": 0.8 * eta, "c": 1.2 * eta})
    # equal metrics -> uniform
    assert alpha_allocation({"a": 1.0, "b": 1.0}, {"a": 5, "b": 7}, 0.6, 0.3) == pytest.approx({"a": 0.6, "b": 0.6})


def test_owl_reference_formulas():
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0])], 3.0) == pytest.approx(0.2)  # thr 8.4
    # pooled over two linears: mean of all 6 = 20/6, M=2 -> thr 6.67 -> one of 6
    assert outlier_ratio([torch.tensor([[1.0, 1.0]]), torch.tensor([1.0, 1.0, 1.0, 15.0])], 2.0) == pytest.approx(1 / 6)
    # n = [0, 1, .5], mean .5: s = 0.7 - 2 * 0.08 * (n - 0.5)
    assert owl_sparsities([0.01, 0.03, 0.02], 0.7, 0.08) == pytest.approx([0.78, 0.62, 0.70])
    assert owl_sparsities([0.02, 0.02], 0.5, 0.08) == pytest.approx([0.5, 0.5])


def test_dense_input_norms_match_a_manual_forward_and_skip_the_head(tiny_llama, calib_ids):
    linears = decoder_linears(tiny_llama)
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: captured.setdefault(n, []).append(a[0].detach()))
             for n, m in linears.items()]
    with torch.no_grad():
        tiny_llama(input_ids=calib_ids, use_cache=False)
    for h in hooks:
        h.remove()
    head_calls = []
    h = tiny_llama.lm_head.register_forward_pre_hook(lambda *a: head_calls.append(1))
    norms = dense_input_norms(tiny_llama, linears, calib_ids, batch_size=4)
    h.remove()
    assert not head_calls
    for n, xs in captured.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double()
        torch.testing.assert_close(norms[n].double(), x.square().sum(0).sqrt(), rtol=1e-4, atol=1e-6)


def test_nm_allocation_hand_case_and_granularity():
    params = {f"b{i}": 1 for i in range(4)}
    # desired densities 8 * (1 - s) = 3.2, 4.8, 4.0, 4.0 -> floors 3, 4, 4, 4 (mean sparsity 0.53125)
    # largest remainder first: b1 (0.8) -> 5 gives mean 0.5 exactly
    alloc = {"b0": 0.6, "b1": 0.4, "b2": 0.5, "b3": 0.5}
    assert nm_allocation(alloc, params, 8, 0.5) == {"b0": 3, "b1": 5, "b2": 4, "b3": 4}
    # grouped: two layers of one block share one N
    n = nm_allocation({"x": 0.7, "y": 0.3, "z": 0.5}, {"x": 1, "y": 1, "z": 2}, 4, 0.5, {"x": 0, "y": 0, "z": 1})
    assert n["x"] == n["y"] == 2 and n["z"] == 2


@pytest.mark.parametrize("seed", range(4))
def test_mixed_nm_targets_meet_the_mean_within_granularity(seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.mlp" for i in range(30)]
    alloc = dict(zip(names, (0.7 + 0.1 * (torch.rand(30, generator=g) - 0.5)).tolist()))
    params = {n: 1000 for n in names}
    alloc = project_to_mean(alloc, params, 0.7)
    targets = make_targets(alloc, Pattern.parse("4:8"), params, target=0.7)
    achieved = weighted_mean({n: t.sparsity for n, t in targets.items()}, params)
    assert abs(achieved - 0.7) <= 0.5 / 8 / 30 + 1e-12  # half a step of one block
    assert all(t.pattern.is_nm and t.pattern.m == 8 and 1 <= t.pattern.n <= 7 for t in targets.values())


@pytest.mark.parametrize("alloc,opts", [("owl", {"lam": 0.1}), ("alpha", {}), ("alpha", {"mapping": "layer", "metric": "alpha"}),
                                        ("alpha", {"metric": "stable_rank", "epsilon": 0.5})])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_allocations_compose_with_every_method(alloc, opts, method, calib_ids, tmp_path, monkeypatch):
    from conftest import tiny_model

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    model = tiny_model("llama", num_hidden_layers=4)
    rep = prunekit.prune(model, PruneConfig(method=method, sparsity=0.6, allocation=alloc, allocation_options=opts),
                         calib=calib_ids)
    a = rep.extra["allocation"]
    assert a["name"] == alloc and abs(a["achieved_mean"] - 0.6) < 1e-4 and abs(rep.allocated_sparsity - 0.6) < 1e-4
    assert 0.0 <= a["min"] < a["max"] <= 0.99  # non-uniform, in bounds
    assert len(a["per_block"]) == 4
    per_layer = {r.name: r.sparsity for r in rep.layers}
    # what was pruned follows the targets (row granularity of 128/64-wide layers)
    assert all(abs(per_layer[r.name] - r.target) < 0.02 for r in rep.layers)


@pytest.mark.parametrize("alloc", ["owl", "alpha"])
def test_mixed_nm_through_prune(alloc, calib_ids, tmp_path, monkeypatch):
    from conftest import tiny_model
    from prunekit.masks import is_nm_sparse

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    model = tiny_model("llama", num_hidden_layers=4)
    rep = prunekit.prune(model, PruneConfig(method="wanda", pattern="4:8", allocation=alloc,
                                            allocation_options={"lam": 0.2} if alloc == "owl" else {"epsilon": 0.5}),
                         calib=calib_ids)
    a = rep.extra["allocation"]
    assert a["achieved_mean"] == pytest.approx(0.5, abs=1 / 8 / 4 / 2 + 1e-9)
    assert len(a["patterns"]) > 1  # really mixed
    lin = decoder_linears(model)
    for r in rep.layers:
        n = int(r.pattern.split(":")[0])
        assert is_nm_sparse(weight_view(lin[r.name]), n, 8)
        assert r.sparsity == pytest.approx(1 - n / 8)


def test_bad_allocation_options_are_config_errors():
    with pytest.raises(ConfigError, match=r"^allocation 'alpha' option metric='nope' is invalid: it must be one of 'alpha', "):
        build_allocator("alpha", {"metric": "nope"})
    with pytest.raises(ConfigError, match=r"option epsilon=1.5 is invalid: it must be a number in \[0.0, 1.0\) \(default 0.3\)$"):
        build_allocator("alpha", {"epsilon": "1.5"})
    with pytest.raises(ConfigError, match=r"option mapping='row' is invalid: it must be one of 'block', 'layer'"):
        build_allocator("alpha", {"mapping": "row"})
    with pytest.raises(ConfigError, match=r"option lam=0.5 is invalid: it must be a number in \[0.0, 0.5\)"):
        build_allocator("owl", {"lam": 0.5})
    with pytest.raises(ConfigError, match=r"^allocation 'owl' has no option 'lamda'; its options are: lam=0.08, m=5.0, "):
        build_allocator("owl", {"lamda": 0.1})
    assert build_allocator("owl", {"lam": "0.1", "batch-size": "4"}).opts.batch_size == 4
