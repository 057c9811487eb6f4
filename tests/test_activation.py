"""Activation sparsity: thresholds, calibration to a target, the masked model, save/load, decode kernels."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit import ActivationSparsityConfig
from prunekit.activation import state_of
from prunekit.formats.activation import read_side_files, write_side_files
from prunekit.activation.base import quantile_threshold
from prunekit.activation.chess import channel_thresholds
from prunekit.errors import ConfigError
from prunekit.kernels import build, prepare_decode

from conftest import rand_ids, tiny_model


def _ids(n=6, seqlen=32, seed=0):
    return rand_ids(n, seqlen, seed)


def _cfg(**kw):
    return ActivationSparsityConfig(**{"sparsity": 0.4, "max_tokens": 4096, "greedy_tokens": 32, **kw})


def test_quantile_threshold_exact():
    v = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.4])
    assert float(quantile_threshold(v, 0.4)) == pytest.approx(0.2)  # 2 of 5 at or below
    assert float(quantile_threshold(v, 0.0)) == -1.0  # nothing zeroed, not even exact zeros
    assert float(quantile_threshold(v, 0.99)) == pytest.approx(0.5)


def test_chess_channel_thresholds_exact():
    h = torch.tensor([[1.0, 4.0], [2.0, 8.0]])  # |h| per token x channel
    up = torch.tensor([2.0, 0.5])  # E|up|: importance = [[2, 2], [4, 4]]
    t = channel_thresholds(h, up, 0.5)  # T = 2 -> t = 2 / E|up|
    assert torch.allclose(t, torch.tensor([1.0, 4.0]))
    assert torch.isinf(channel_thresholds(h, torch.tensor([1.0, 0.0]), 0.5)[1])


def test_scaled_threshold_exact():
    from prunekit.activation.base import scaled_threshold

    x = torch.tensor([[1.0, 1.0, 3.0], [2.0, 0.5, 6.0]])  # |x| per token x channel
    c = torch.tensor([4.0, 1.0, 0.0])  # scores [[4, 1, 0], [8, .5, 0]]: 4 of 6 at or below 1
    t = scaled_threshold(x, c, 4 / 6)
    assert torch.allclose(t[:2], torch.tensor([0.25, 1.0])) and torch.isinf(t[2])  # T / c; c = 0: never kept
    assert torch.equal(scaled_threshold(x, c, 0.0), torch.full((3,), -1.0))


@pytest.mark.parametrize("alloc", ["uniform", "greedy"])
def test_wina_scores_inputs_by_weight_column_norms(alloc):
    model, ids = tiny_model("llama"), _ids()
    with torch.no_grad():  # columns of very different norms: WINA's mask must differ from TEAL's
        model.model.layers[0].mlp.down_proj.weight.mul_(torch.linspace(0.1, 3.0, model.config.intermediate_size))
    st = prunekit.sparsify_activations(model, _cfg(method="wina", allocation=alloc), calib=ids)
    for name, site in st.sites.items():
        assert site.channelwise and site.kind == "input"
        if st.report["sites"][name]["target"] == 0:  # greedy left it dense: -1 everywhere
            assert torch.equal(st.thresholds[name], torch.full_like(st.thresholds[name], -1.0))
            continue
        norms = torch.linalg.vector_norm(model.get_submodule(name).weight.detach().float(), dim=0)
        big = st.thresholds[name] * norms  # one threshold T on |x| * ||W[:, i]||, whatever the channel
        assert torch.allclose(big, big[0].expand_as(big), rtol=1e-5), name
    t = st.thresholds["model.layers.0.mlp.down_proj"]
    assert float(t[0]) > 10 * float(t[-1])  # a column 30x larger keeps 30x smaller activations


@pytest.mark.parametrize("bad,match", [
    (dict(sparsity=1.0), "activation sparsity=1.0"), (dict(sparsity=-0.1), "activation sparsity=-0.1"),
    (dict(method="relu"), "unknown activation method 'relu'"), (dict(allocation="owl"), "allocation='owl'"),
    (dict(method="cats", allocation="greedy"), "teal or wina"), (dict(greedy_step=0.0), "greedy_step"),
    (dict(max_tokens=1), "max_tokens"), (dict(include=("[",)), "regex"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        ActivationSparsityConfig(**bad)


@pytest.mark.parametrize("method,alloc", [("teal", "uniform"), ("teal", "greedy"), ("cats", "uniform"),
                                          ("chess", "uniform"), ("wina", "uniform"), ("wina", "greedy")])
def test_thresholds_hit_the_target_on_calibration_data(method, alloc):
    model, ids = tiny_model("llama"), _ids()
    st = prunekit.sparsify_activations(model, _cfg(method=method, allocation=alloc), calib=ids)
    rep = st.report
    assert rep["mean_target"] == pytest.approx(0.4, abs=0.02)
    assert rep["mean_sparsity"] == pytest.approx(rep["mean_target"], abs=0.02)
    n = ids.numel()
    for name, r in rep["sites"].items():  # sites whose inputs the block's own thresholds do not change: exact
        if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", ".mlp")):
            width = r["width"]
            assert r["sparsity"] == pytest.approx(r["target"], abs=1.5 / (n * (1 if r["kind"] == "gate" else 1)) + 1e-3
                                                  if width else 1e-3), name
    if alloc == "greedy":
        assert len({round(r["target"], 4) for r in rep["sites"].values()}) > 1  # not uniform


def test_greedy_beats_uniform_on_block_error():
    ids = _ids()
    errs = {}
    for alloc in ("uniform", "greedy"):
        model = tiny_model("llama")
        with torch.no_grad():
            ref = model(ids).logits
        prunekit.sparsify_activations(model, _cfg(allocation=alloc), calib=ids)
        with torch.no_grad():
            errs[alloc] = float((model(ids).logits - ref).norm())
    assert errs["greedy"] < errs["uniform"]


@pytest.mark.parametrize("method", ["teal", "cats", "chess", "wina"])
def test_remove_restores_the_dense_model_exactly(method):
    model, ids = tiny_model("qwen2"), _ids()
    with torch.no_grad():
        ref = model(ids).logits
    st = prunekit.sparsify_activations(model, _cfg(method=method), calib=ids)
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, ref)
        st.remove()
        assert torch.equal(model(ids).logits, ref)


def test_cats_needs_a_gated_mlp():
    model = tiny_model("opt")
    with pytest.raises(ConfigError, match="not a gated MLP"):
        prunekit.sparsify_activations(model, _cfg(method="cats"), calib=_ids())


def test_side_files_round_trip(tmp_path):
    model, ids = tiny_model("llama"), _ids()
    st = prunekit.sparsify_activations(model, _cfg(method="chess"), calib=ids)
    write_side_files(st, tmp_path)
    back = read_side_files(tmp_path)
    assert back.method == "chess" and back.sites.keys() == st.sites.keys()
    for name, t in st.thresholds.items():
        assert torch.equal(back.thresholds[name], t.float())


def test_save_load_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    model, ids = tiny_model("llama"), _ids()
    with torch.no_grad():
        dense = model(ids).logits
    prunekit.sparsify_activations(model, _cfg(), calib=ids)
    with torch.no_grad():
        masked = model(ids).logits
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    from prunekit.formats import save_with_thresholds

    out, how = save_with_thresholds(model, tok, tmp_path / "m")
    assert "from_pretrained loads the dense model" in how and (out / "activation_sparsity.json").is_file()
    assert not list(out.glob(".*"))  # no temporary or lock files left inside
    loaded, _ = prunekit.load_model(str(out))
    assert state_of(loaded) is not None
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, masked, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert torch.allclose(plain(ids).logits, dense, atol=1e-5)  # the plain loader: the dense model
    assert "DENSE" in (out / "activation_sparsity.json").read_text()


@pytest.fixture(params=["cpp", "torch"])
def kernel_path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("PRUNEKIT_KERNELS", "off")
    else:
        monkeypatch.delenv("PRUNEKIT_KERNELS", raising=False)
        if not build.available():
            pytest.skip(f"C++ kernels unavailable: {build.why_unavailable()}")
    yield request.param


@pytest.mark.parametrize("method", ["teal", "cats", "chess", "wina"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernels_equal_the_masked_model(kernel_path, method, dtype):
    model, ids = tiny_model("qwen2"), _ids()
    prunekit.sparsify_activations(model, _cfg(method=method), calib=ids)
    model.to(dtype)
    seq = _ids(1, 12, seed=7)  # not calibration tokens: none of its values sits exactly on a threshold
    with torch.inference_mode():
        ref = model(seq).logits[0].float()  # every token masked: what the kernels compute token by token
        handle = prepare_decode(model)
        converted = len(handle.linears) + len(handle.ffns)
        out = model(seq[:, :1], use_cache=True)
        rows = [out.logits[0, -1]]
        for i in range(1, seq.shape[1]):
            out = model(seq[:, i:i + 1], cache=out.cache, use_cache=True)
            rows.append(out.logits[0, -1])
        handle.restore()
        again = model(seq).logits[0].float()
    got = torch.stack(rows).float()
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert (got[1:] - ref[1:]).abs().max() < tol * max(1.0, float(ref.abs().max()))
    assert torch.equal(again, ref)  # restore gives back the masked model bit for bit
    assert converted > 0


def test_weight_sparse_bitmask_decode_and_restore(kernel_path):
    model, ids = tiny_model("llama"), _ids()
    prunekit.prune(model, prunekit.PruneConfig(method="magnitude", sparsity=0.5))
    seq = ids[:1, :8]
    with torch.inference_mode():
        ref = model(seq).logits[0]
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        handle = prepare_decode(model, "auto")
        assert all(m.fmt == "bitmask" for m in handle.linears.values()) and len(handle.linears) == 14
        out = model(seq[:, :1], use_cache=True)
        rows = [out.logits[0, -1]]
        for i in range(1, seq.shape[1]):
            out = model(seq[:, i:i + 1], cache=out.cache, use_cache=True)
            rows.append(out.logits[0, -1])
        prefill = model(seq).logits[0]  # more than one token: dense matmul on the unpacked weights
        handle.restore()
    assert torch.allclose(torch.stack(rows), ref, atol=1e-4)
    assert torch.allclose(prefill, ref, atol=1e-5)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_prepare_decode_rejects_what_it_cannot_run():
    model = tiny_model("llama").to(torch.float16)
    with pytest.raises(ConfigError, match="float32 or bfloat16"):
        prepare_decode(model)
    with pytest.raises(ConfigError, match="weight format"):
        prepare_decode(tiny_model("llama"), "csr")


@pytest.mark.integration
def test_smollm2_teal_decode_matches_masked_model(smollm2):
    import copy

    model, tok = smollm2
    model = copy.deepcopy(model)  # the session's model must stay dense
    ids = tok("It is a truth universally acknowledged, that a single man in possession of a good fortune",
              return_tensors="pt").input_ids
    other = tok("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition",
                return_tensors="pt").input_ids
    calib = torch.cat([other[:, :16], other.flip(1)[:, :16]])  # not the tokens scored below: a threshold equal
    st = prunekit.sparsify_activations(model, _cfg(sparsity=0.4, max_tokens=64), calib=calib)  # to a value flips
    assert st.report["mean_sparsity"] == pytest.approx(0.4, abs=0.05)
    seq = ids[:, :10]
    with torch.inference_mode():
        ref = model(seq).logits[0, -1]
        handle = prepare_decode(model)
        out = model(seq[:, :1], use_cache=True)
        for i in range(1, seq.shape[1]):
            out = model(seq[:, i:i + 1], cache=out.cache, use_cache=True)
        handle.restore()
    assert torch.allclose(out.logits[0, -1], ref, atol=1e-3, rtol=1e-4)
