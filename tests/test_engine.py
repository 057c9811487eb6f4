"""The sequential engine: exactness, statistics, and the method x pattern x allocation matrix
on tiny random models of six architectures."""

import pytest
import torch

from conftest import tiny_model
from prunekit import PruneConfig, prune
from prunekit.calibration import run_sequential
from prunekit.masks import Pattern, is_nm_sparse
from prunekit.methods import CompressResult, Method, Target
from prunekit.models import decoder_linears, find_blocks, weight_view
from prunekit.registry import ALLOCATORS


class Identity(Method):
    """Touches nothing, records the statistics it was given."""

    name = "identity"
    needs_hessian = True

    def __init__(self):
        super().__init__()
        self.seen = {}

    def compress(self, name, linear, stats, target):
        self.seen[name] = (stats.count, stats.scaler.clone(), stats.xtx.clone())
        return CompressResult()


def _dense_last_block_outputs(model, ids, bs):
    _, blocks = find_blocks(model)
    outs = []
    h = blocks[-1].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for i in range(0, ids.shape[0], bs):
            model(input_ids=ids[i : i + bs], use_cache=False)
    h.remove()
    return outs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identity_method_reproduces_dense_forward_bit_for_bit(arch, calib_ids):
    model = tiny_model(arch)
    before = {n: weight_view(m).clone() for n, m in decoder_linears(model).items()}
    dense = _dense_last_block_outputs(model, calib_ids, bs=4)
    got = {}

    def cb(ev):
        if ev.index == ev.total - 1:
            got["out"] = [t.clone() for t in ev.outputs]

    targets = {n: Target(0.5) for n in decoder_linears(model)}
    run_sequential(model, calib_ids, Identity(), targets, batch_size=4, callback=cb, keep_outputs=True)
    assert len(got["out"]) == len(dense)
    for a, b in zip(got["out"], dense):
        assert torch.equal(a, b)
    for n, m in decoder_linears(model).items():
        assert torch.equal(weight_view(m), before[n])


def test_statistics_equal_those_of_plain_hooks_despite_sharing_and_early_exit(calib_ids):
    model = tiny_model("llama")
    linears = decoder_linears(model)
    xs = {n: [] for n in linears}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    for h in hooks:
        h.remove()
    method = Identity()
    run_sequential(model, calib_ids, method, {n: Target(0.5) for n in linears}, batch_size=2)
    nseq = calib_ids.shape[0]
    for n, m in linears.items():
        x = torch.cat(xs[n]).float()
        count, scaler, xtx = method.seen[n]
        assert count == x.shape[0]
        # the reference normalisations: per-sequence means (wanda scaler_row, SparseGPT's H)
        torch.testing.assert_close(scaler * nseq, (x * x).sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xtx, 2 * x.t() @ x / nseq, rtol=1e-4, atol=1e-4)


def test_statistics_do_not_depend_on_the_batch_size(calib_ids):
    """Accumulated one sequence at a time, the statistics are bit-identical for any batch size."""
    seen = []
    for bs in (1, 3):
        model = tiny_model("llama")
        method = Identity()
        run_sequential(model, calib_ids, method, {n: Target(0.5) for n in decoder_linears(model)}, batch_size=bs)
        seen.append([method.seen[n] for n in decoder_linears(model)])
    for (c1, s1, h1), (c2, s2, h2) in zip(*seen):
        assert c1 == c2 and torch.equal(s1, s2) and torch.equal(h1, h2)


ARCHS = ["llama", "qwen2", "mistral", "opt", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_architectures_end_to_end(arch, method, calib_ids):
    model = tiny_model(arch)
    cfg = PruneConfig(method=method, sparsity=0.5)
    report = prune(model, cfg, calib=calib_ids)
    linears = decoder_linears(model)
    assert len(report.layers) == len(linears) > 0
    for n, m in linears.items():
        w = weight_view(m)
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01), n
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        logits = model(input_ids=calib_ids[:2]).logits
    assert torch.isfinite(logits).all()
    if method != "magnitude":
        assert all(b.rel_error is not None and b.rel_error > 0 for b in report.blocks)


@pytest.mark.parametrize("allocation", ALLOCATORS.names())
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_method_pattern_allocation_matrix(allocation, method, pattern, calib_ids):
    model = tiny_model("llama", num_hidden_layers=3)
    pat = Pattern.parse(pattern)
    sparsity = 0.5 if pat.is_nm else 0.6
    cfg = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, allocation=allocation)
    report = prune(model, cfg, calib=calib_ids)
    assert report.allocated_sparsity == pytest.approx(sparsity, abs=0.02 if pat.is_nm else 1e-4)
    assert report.sparsity == pytest.approx(report.allocated_sparsity, abs=0.01)
    for rec in report.layers:
        w = weight_view(model.get_submodule(rec.name))
        if pat.is_nm:
            p = Pattern.parse(rec.pattern)
            assert is_nm_sparse(w, p.n, p.m), rec.name
        assert 0.0 <= rec.target <= 0.99


def test_block_error_is_the_relative_output_error_of_the_first_batch(calib_ids):
    model = tiny_model("llama", num_hidden_layers=1)
    _, blocks = find_blocks(model)
    outs = []
    hook = blocks[0].register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=calib_ids[:2], use_cache=False)
        report = prune(model, PruneConfig(method="wanda", sparsity=0.5, calib={"batch_size": 2}), calib=calib_ids)
        model(input_ids=calib_ids[:2], use_cache=False)
    hook.remove()
    dense, pruned = outs[0], outs[-1]
    assert report.blocks[0].rel_error == pytest.approx(float((pruned - dense).norm() / dense.norm()), rel=1e-5)


def test_include_exclude_select_layers(calib_ids):
    model = tiny_model("llama")
    cfg = PruneConfig(method="wanda", sparsity=0.5, include=(r"mlp\.",), exclude=(r"down_proj",))
    report = prune(model, cfg, calib=calib_ids)
    names = {r.name for r in report.layers}
    assert names and all(("gate_proj" in n or "up_proj" in n) for n in names)
    q = weight_view(model.get_submodule("model.layers.0.self_attn.q_proj"))
    assert int((q == 0).sum()) == 0


def test_seeded_runs_are_bit_identical(calib_ids):
    outs = []
    for _ in range(2):
        model = tiny_model("llama")
        prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), calib=calib_ids)
        outs.append(torch.cat([weight_view(m).flatten() for m in decoder_linears(model).values()]))
    assert torch.equal(outs[0], outs[1])


def test_bf16_model_prunes_with_fp32_statistics(calib_ids):
    model = tiny_model("llama", dtype=torch.bfloat16)
    report = prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), calib=calib_ids)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert all(weight_view(m).dtype == torch.bfloat16 for m in decoder_linears(model).values())
