"""ALPS, RIA, SparseSwaps and block reconstruction through the engine: every pattern and allocation,
masks held exactly, streamed equal to in memory, structured models, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import save_tiny, tiny_model
from prunekit import PruneConfig, load_model, prune
from prunekit.errors import ConfigError
from prunekit.masks import is_nm_sparse
from prunekit.models import decoder_linears, weight_view
from prunekit.registry import ALLOCATORS

FAST_RECON = {"epochs": 1, "lr": 1e-3, "lstsq_iters": 5}
NEW = [("alps", None, {}), ("ria", None, {}), ("wanda", "swaps", {}), ("magnitude", "reconstruct", FAST_RECON)]
METHOD_OPTS = {"alps": {"max_iter": 30}}  # the tiny layers' supports settle late; 30 iterations suffice here
ALLOCS = ALLOCATORS.names()  # per-layer allocators ("global" is the structured family's own)


def _config(method, refine, ropts, **kw):
    alloc_opts = {"cache": False} if kw.get("allocation") == "alpha" else {}
    return PruneConfig(method=method, refine=refine, refine_options=ropts, calib={"batch_size": 2},
                       allocation_options=alloc_opts, method_options=METHOD_OPTS.get(method, {}), **kw)


def _zeros(model):
    return {n: weight_view(m) == 0 for n, m in decoder_linears(model).items()}


@pytest.mark.parametrize("allocation", ALLOCS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("method,refine,ropts", NEW)
def test_method_pattern_allocation_matrix(method, refine, ropts, pattern, allocation, calib_ids):
    model = tiny_model("llama")
    sparsity = 0.6 if pattern == "unstructured" or allocation != "uniform" else None
    report = prune(model, _config(method, refine, ropts, sparsity=sparsity, pattern=pattern, allocation=allocation),
                   calib=calib_ids)
    target = report.target_sparsity
    assert abs(report.sparsity - target) < 0.03
    for name, m in decoder_linears(model).items():
        w = weight_view(m)
        assert torch.isfinite(w).all()
        assert not torch.signbit(w[w == 0]).any(), f"{name}: -0.0 written"
        if pattern != "unstructured" and allocation == "uniform":
            n, mm = map(int, pattern.split(":"))
            assert is_nm_sparse(w, n, mm), name


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("opts", [{}, {"inputs": "pruned"}, {"inputs": "pruned", "target": "local"},
                                  {"train": "linears", "amp": "none"}])
def test_reconstruct_keeps_the_masks_exactly_and_moves_the_kept_weights(pattern, opts, calib_ids):
    base = tiny_model("llama")
    sparsity = 0.6 if pattern == "unstructured" else None
    plain, refined = copy.deepcopy(base), copy.deepcopy(base)
    prune(plain, _config("magnitude", None, {}, sparsity=sparsity, pattern=pattern), calib=calib_ids)
    rep = prune(refined, _config("magnitude", "reconstruct", {**FAST_RECON, **opts}, sparsity=sparsity,
                                 pattern=pattern), calib=calib_ids)
    za, zb = _zeros(plain), _zeros(refined)  # magnitude masks do not depend on the inputs: the same in both runs
    assert all(torch.equal(za[n], zb[n]) for n in za)
    moved = [n for n, m in decoder_linears(refined).items()
             if not torch.equal(weight_view(m), weight_view(decoder_linears(plain)[n]))]
    assert len(moved) == len(za)
    info = rep.blocks[0].info
    assert info["steps"] > 0 and info["finite"] and info["inputs"] == opts.get("inputs", "dense")
    norms = [p for n, p in refined.named_parameters() if "layernorm" in n]
    dense_norms = [p for n, p in base.named_parameters() if "layernorm" in n]
    changed = any(not torch.equal(a, b) for a, b in zip(norms, dense_norms))
    assert changed == (opts.get("train", "all") == "all")


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "none")])
def test_reconstruct_auto_precision_is_float32_on_a_cpu_without_bf16(monkeypatch, has_bf16, expected, calib_ids):
    # Without AVX-512 BF16 / AMX, torch's bf16 backward runs generic loops (17x slower than float32 measured on
    # an AVX2-only EPYC): "auto" must not pick bf16 there, and the block's report names what it used.
    import prunekit.models.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    assert runtime.fast_amp(torch.device("cpu")) == expected
    assert runtime.fast_amp(torch.device("meta")) == "none"
    model = tiny_model("llama")
    rep = prune(model, _config("magnitude", "reconstruct", FAST_RECON, sparsity=0.5), calib=calib_ids)
    assert rep.blocks[0].info["amp"] == expected


def test_reconstruct_lowers_each_blocks_error_against_the_dense_block(calib_ids):
    base = tiny_model("llama")
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ra = prune(a, _config("wanda", None, {}, sparsity=0.7), calib=calib_ids)
    rb = prune(b, _config("wanda", "reconstruct", {"epochs": 0}, sparsity=0.7), calib=calib_ids)
    assert rb.blocks[0].rel_error < ra.blocks[0].rel_error  # least squares alone, on block 0's identical inputs
    layer = rb.layers[0].info["refine"]["lstsq"]
    assert layer["error_after"] < layer["error_before"]


@pytest.mark.parametrize("cfg", [
    dict(method="alps", sparsity=0.6),
    dict(method="ria", pattern="2:4", sparsity=None, method_options={"permute": True}),
    dict(method="wanda", sparsity=0.6, refine="swaps"),
    dict(method="sparsegpt", pattern="2:4", sparsity=None, refine="swaps"),
    dict(method="wanda", sparsity=0.6, refine="reconstruct", refine_options=FAST_RECON),
    dict(method="magnitude", sparsity=0.6, refine="reconstruct", refine_options={**FAST_RECON, "inputs": "pruned"}),
    dict(method="wanda", pattern="2:4", sparsity=None, refine="reconstruct",
         refine_options={**FAST_RECON, "inputs": "pruned", "target": "local"}),
])
def test_streamed_prune_equals_in_memory_bit_for_bit(cfg, tmp_path):
    if cfg.get("method_options", {}).get("permute"):
        pytest.importorskip("scipy")
    from prunekit.data import calibration_ids
    from prunekit.config import CalibConfig
    from prunekit.streaming import open_lazy, prune_streamed

    folder = save_tiny(tmp_path / "tiny", num_hidden_layers=3)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. It is a truth universally acknowledged. " * 80)
    config = PruneConfig(**cfg, calib={"batch_size": 2})
    model, tok = load_model(str(folder))
    ids = calibration_ids(CalibConfig(str(text), nsamples=4, seqlen=32), tok)
    prune(model, config, calib=ids)
    lazy, _ = open_lazy(str(folder))
    out = tmp_path / "out"
    out.mkdir()
    prune_streamed(lazy, config, out, tok, calib=ids)
    tok.save_pretrained(out)
    streamed, _ = load_model(str(out))
    a, b = model.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("pattern,criterion", [("channels", "slimgpt"), ("width", "flap")])
def test_reconstruct_after_structured_pruning_keeps_the_removed_units_removed(pattern, criterion, calib_ids):
    base = tiny_model("llama")
    plain, refined = copy.deepcopy(base), copy.deepcopy(base)
    ra = prune(plain, PruneConfig(method=criterion, pattern=pattern, sparsity=0.25, calib={"batch_size": 2}),
               calib=calib_ids)
    rb = prune(refined, PruneConfig(method=criterion, pattern=pattern, sparsity=0.25, calib={"batch_size": 2},
                                    refine="reconstruct", refine_options=FAST_RECON), calib=calib_ids)
    assert ra.extra["structure"]["params"] == rb.extra["structure"]["params"]
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(plain) == shapes(refined)
    assert rb.blocks[0].info["steps"] > 0
    with torch.no_grad():
        assert torch.isfinite(refined(calib_ids).logits).all()


def test_refine_errors_are_one_clear_line():
    with pytest.raises(ConfigError, match="refine='dsnot' works on unstructured masks"):
        PruneConfig(method="slimgpt", pattern="channels", sparsity=0.25, refine="dsnot")
    with pytest.raises(ConfigError, match="removes whole blocks"):
        PruneConfig(method="shortgpt", pattern="blocks", sparsity=0.25, refine="reconstruct")
    with pytest.raises(ConfigError, match="inputs='everything' is invalid"):
        PruneConfig(method="wanda", refine="reconstruct", refine_options={"inputs": "everything"})
    with pytest.raises(ConfigError, match="option rho=-1"):
        PruneConfig(method="alps", method_options={"rho": -1})


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_a_micro_batch_of_a_block_call_equals_the_same_rows_of_the_whole_batch(arch, calib_ids):
    """Block reconstruction trains on micro-batches: masks, position ids and rotary tables are sliced with the rows."""
    from prunekit.calibration.context import calibration_forward_context, capture_block_inputs
    from prunekit.calibration.engine import _block_runner
    from prunekit.models import find_blocks

    model = tiny_model(arch)
    _, blocks = find_blocks(model)
    with calibration_forward_context(model):
        inputs = capture_block_inputs(model, blocks, calib_ids[:4], 4, torch.device("cpu"))
        for i in range(len(blocks)):
            run = _block_runner(i, blocks[i], inputs)
            whole = run(0, inputs.hidden[0])
            for rows in (slice(0, 2), slice(2, 4), slice(1, 2)):
                assert torch.allclose(run(0, inputs.hidden[0], rows), whole[rows], atol=1e-5, rtol=1e-4)
            inputs.hidden[0] = whole


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "qwen2"])
def test_reconstruct_on_other_architectures_keeps_masks(arch, calib_ids):
    base = tiny_model(arch)
    plain, refined = copy.deepcopy(base), copy.deepcopy(base)
    cfg = dict(sparsity=0.6, calib={"batch_size": 3})
    prune(plain, PruneConfig(method="magnitude", **cfg), calib=calib_ids)
    rep = prune(refined, PruneConfig(method="magnitude", refine="reconstruct",
                                     refine_options={**FAST_RECON, "micro_batch": 2}, **cfg), calib=calib_ids)
    za, zb = _zeros(plain), _zeros(refined)
    assert all(torch.equal(za[n], zb[n]) for n in za) and all(b.info["finite"] for b in rep.blocks)


def test_reconstruct_holdout_undoes_a_fit_that_hurts_the_held_out_sequences(calib_ids):
    # lr 0.5 wrecks every block: the held-out MSE rises, each fit is undone, and the model is the plain prune's.
    base = tiny_model("llama")
    plain, guarded = copy.deepcopy(base), copy.deepcopy(base)
    prune(plain, _config("wanda", None, {}, sparsity=0.6), calib=calib_ids)
    opts = {"epochs": 2, "lr": 0.5, "lstsq": False, "holdout": 2, "amp": "none"}
    rep = prune(guarded, _config("wanda", "reconstruct", opts, sparsity=0.6), calib=calib_ids)
    for block in rep.blocks:
        info = block.info
        assert info["reverted"] and info["heldout_after"] > info["heldout_before"]
        assert info["steps"] == 2 * 2  # 4 of the 6 sequences fit, in micro-batches of 2, twice
    for (n, a), (_, b) in zip(plain.named_parameters(), guarded.named_parameters()):
        assert torch.equal(a, b), n


def test_reconstruct_holdout_keeps_a_fit_that_helps_and_reports_both_errors(calib_ids):
    model = tiny_model("llama")
    opts = {"epochs": 3, "lr": 1e-3, "lstsq": False, "holdout": 2, "amp": "none"}
    rep = prune(model, _config("wanda", "reconstruct", opts, sparsity=0.6), calib=calib_ids)
    kept = [b.info for b in rep.blocks if not b.info["reverted"]]
    assert kept and all(i["heldout_after"] < i["heldout_before"] for i in kept)


def test_reconstruct_holdout_that_leaves_nothing_to_fit_is_refused_before_work(calib_ids, tmp_path):
    with pytest.raises(ConfigError, match="--refine-option holdout=6 leaves none of the 6 calibration sequences"):
        prune(tiny_model("llama"), _config("wanda", "reconstruct", {"holdout": 6}, sparsity=0.5), calib=calib_ids)
    from prunekit.streaming import open_lazy, prune_streamed  # the streamed path calibrates on its own

    lazy, _ = open_lazy(str(save_tiny(tmp_path / "m")))
    with pytest.raises(ConfigError, match="--refine-option holdout=6 leaves none of the 6 calibration sequences"):
        prune_streamed(lazy, _config("wanda", "reconstruct", {"holdout": 6}, sparsity=0.5), tmp_path / "out",
                       calib=calib_ids)
    assert not list(tmp_path.glob("out/*.safetensors"))  # refused before any block was written


def test_split_holdout_takes_the_last_sequences_across_batches():
    from prunekit.methods.blockfit import split_holdout

    train, held = split_holdout([4, 4, 2], 3, 2)
    assert train == [[slice(0, 2), slice(2, 4)], [slice(0, 2), slice(2, 3)], []]
    assert held == [[], [slice(3, 4)], [slice(0, 2)]]
    assert split_holdout([3], 0, 2) == ([[slice(0, 2), slice(2, 3)]], [[]])
