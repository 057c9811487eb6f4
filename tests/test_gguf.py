"""GGUF export on tiny random models of every supported architecture: names, shapes, metadata, the
per-layer q/k row order, quantization rules, refusals — read back with ``gguf.GGUFReader``; and, where
llama.cpp is built (``python benchmarks/llamacpp.py build``), llama.cpp's logits against PyTorch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_model, tiny_tokenizer
from prunekit.errors import ConfigError
from prunekit.formats import llamacpp
from prunekit.formats.gguf import FILE_TYPE, GGUFOptions, export_gguf, precheck
from prunekit.models.shrink import remove_channels, remove_heads
from prunekit.models.structure import block_parts

gguf = pytest.importorskip("gguf")
needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama.cpp not built "
                                    "(python benchmarks/llamacpp.py build)")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(320)


def _model(arch: str, tok, **over) -> nn.Module:
    """A tiny model whose weights are large enough that every layer visibly changes the logits."""
    if arch == "gemma3":
        over.setdefault("query_pre_attn_scalar", 16)
    m = tiny_model(arch, vocab_size=len(tok), **over)
    g = torch.Generator().manual_seed(1)
    for n, p in m.named_parameters():
        if p.dim() > 1:
            p.data.mul_(5.0)
        else:
            p.data.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


class NoAttention(nn.Module):
    """An attention sub-block that was taken out: adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def _per_layer(tok, arch: str = "llama") -> nn.Module:
    """4 blocks: dense; 1 KV group and half the FFN; no attention; no FFN (attention kept)."""
    m = _model(arch, tok, num_hidden_layers=4)
    parts = block_parts(m)
    remove_heads(m, parts[1].attn, [], [1])
    remove_channels(m, parts[1].ffn, range(64))
    m.model.layers[2].self_attn = NoAttention()
    remove_channels(m, parts[3].ffn, range(128))
    return m.eval()


def _read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    return r, fields, {t.name: t for t in r.tensors}


def _f32(t) -> np.ndarray:
    """A tensor's values in torch order ([out, in])."""
    return np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)])


def _adjacent_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference for the RoPE row order, index by index: GGUF row 2j <- row j, 2j+1 <- row j + d/2 of each head."""
    d = w.shape[0] // heads
    rows = [h * d + (j // 2 if j % 2 == 0 else d // 2 + j // 2) for h in range(heads) for j in range(d)]
    return w[rows]


def _export(m, tok, tmp_path, quant="f32", **kw):
    out = tmp_path / f"m-{quant}.gguf"
    rep = export_gguf(m, tok, out, GGUFOptions(quant, **kw), overwrite=True)
    return out, rep


def test_llama_gqa_names_shapes_metadata_and_row_order(tok, tmp_path):
    m = _model("llama", tok)
    out, rep = _export(m, tok, tmp_path)
    assert rep.arch == "llama"
    r, f, t = _read(out)
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.attention.key_length"] == f["llama.rope.dimension_count"] == 16
    assert f["llama.rope.freq_base"] == pytest.approx(m.config.rope_parameters["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(m.config.rms_norm_eps)
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in range(2) for n in per_block}
    assert set(t) == expected
    sd = m.state_dict()
    assert list(t["blk.1.attn_q.weight"].shape) == [64, 64] and list(t["blk.1.attn_k.weight"].shape) == [64, 32]
    q, k = sd["model.layers.1.self_attn.q_proj.weight"], sd["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(_f32(t["blk.1.attn_q.weight"]), _adjacent_pairs(q, 4).numpy())
    np.testing.assert_array_equal(_f32(t["blk.1.attn_k.weight"]), _adjacent_pairs(k, 2).numpy())
    np.testing.assert_array_equal(_f32(t["blk.1.attn_v.weight"]), sd["model.layers.1.self_attn.v_proj.weight"].numpy())
    np.testing.assert_array_equal(_f32(t["blk.0.ffn_down.weight"]), sd["model.layers.0.mlp.down_proj.weight"].numpy())
    np.testing.assert_array_equal(_f32(t["token_embd.weight"]), sd["model.embed_tokens.weight"].numpy())


def test_tied_embeddings_write_no_output_tensor(tok, tmp_path):
    m = _model("llama", tok, tie_word_embeddings=True)
    out, _ = _export(m, tok, tmp_path)
    assert "output.weight" not in _read(out)[2]


def test_vocabulary_is_the_tokenizers(tok, tmp_path):
    out, _ = _export(_model("llama", tok), tok, tmp_path)
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("tokenizer.")}
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tok.get_vocab()
    assert f["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json

    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(x) if isinstance(x, list) else x for x in merges]
    eos = tok.eos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == eos and f["tokenizer.ggml.token_type"][eos] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.add_bos_token"] is False


def test_pre_tokenizer_names():
    from prunekit.formats.gguf_vocab import _pre_name

    bl = {"type": "ByteLevel", "use_regex": True}
    assert _pre_name(bl) == "gpt-2"
    assert _pre_name({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, bl]}) == "smollm"
    qwen = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    split = {"type": "Split", "pattern": {"Regex": qwen}}
    nore = {"type": "ByteLevel", "use_regex": False}
    assert _pre_name({"type": "Sequence", "pretokenizers": [split, nore]}) == "qwen2"
    llama3 = {"type": "Split", "pattern": {"Regex": qwen.replace(r"\p{N}|", r"\p{N}{1,3}|")}}
    assert _pre_name({"type": "Sequence", "pretokenizers": [llama3, nore]}) == "llama-bpe"
    assert _pre_name({"type": "Metaspace"}) is None


def test_spm_scores_follow_merge_ranks():
    from prunekit.formats.gguf_vocab import _spm_vocab

    model = {"vocab": {"a": 0, "b": 1, "ab": 2, "abb": 3, "<0x41>": 4, "zz": 5}, "merges": [["a", "b"], ["ab", "b"]]}
    tokens = ["a", "b", "ab", "abb", "<0x41>", "zz"]
    v = _spm_vocab(model, tokens, {}, {})
    assert v.model == "llama" and v.scores[2] == 0.0 and v.scores[3] == -1.0
    assert v.scores[0] < v.scores[3] and v.scores[5] < v.scores[3]  # never made by a merge: lowest priority
    assert v.types[4] == gguf.TokenType.BYTE and v.types[0] == gguf.TokenType.NORMAL


def test_qwen2_keeps_its_arch_biases_and_row_order(tok, tmp_path):
    m = _model("qwen2", tok)
    out, rep = _export(m, tok, tmp_path)
    r, f, t = _read(out)
    assert rep.arch == "qwen2" and f["general.architecture"] == "qwen2"
    sd = m.state_dict()
    for n in ("q", "k", "v"):
        np.testing.assert_array_equal(_f32(t[f"blk.0.attn_{n}.bias"]), sd[f"model.layers.0.self_attn.{n}_proj.bias"].numpy())
    np.testing.assert_array_equal(_f32(t["blk.0.attn_q.weight"]), sd["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_qwen2_with_per_layer_widths_becomes_deci_with_reordered_biases(tok, tmp_path):
    m = _model("qwen2", tok)
    remove_channels(m, block_parts(m)[1].ffn, range(32))
    out, rep = _export(m, tok, tmp_path)
    r, f, t = _read(out)
    assert rep.arch == "deci" and list(f["deci.feed_forward_length"]) == [128, 96]
    bq = m.state_dict()["model.layers.0.self_attn.q_proj.bias"]
    np.testing.assert_array_equal(_f32(t["blk.0.attn_q.bias"]), _adjacent_pairs(bq, 4).numpy())


def test_gemma3_norms_sliding_pattern_and_rope_bases(tok, tmp_path):
    m = _model("gemma3", tok)
    out, rep = _export(m, tok, tmp_path)
    r, f, t = _read(out)
    assert rep.arch == "gemma3"
    assert list(f["gemma3.attention.sliding_window_pattern"]) == [True, False, True, False]
    assert f["gemma3.attention.sliding_window"] == 4
    rp = m.config.rope_parameters
    assert f["gemma3.rope.freq_base"] == pytest.approx(rp["full_attention"]["rope_theta"])
    assert f["gemma3.rope.freq_base_swa"] == pytest.approx(rp["sliding_attention"]["rope_theta"])
    sd = m.state_dict()
    for src, dst in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                     ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
                     ("self_attn.q_norm", "attn_q_norm")):
        np.testing.assert_allclose(_f32(t[f"blk.1.{dst}.weight"]), sd[f"model.layers.1.{src}.weight"].numpy() + 1, rtol=0, atol=0)
    np.testing.assert_array_equal(_f32(t["blk.0.attn_q.weight"]), sd["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_gemma3_refusals(tok, tmp_path):
    m = _model("gemma3", tok)
    remove_channels(m, block_parts(m)[1].ffn, range(32))
    with pytest.raises(ConfigError, match="per-layer widths"):
        _export(m, tok, tmp_path)
    with pytest.raises(ConfigError, match="query_pre_attn_scalar=256"):
        _export(_model("gemma3", tok, query_pre_attn_scalar=256), tok, tmp_path)
    assert not list(tmp_path.iterdir())


def test_deci_per_layer_heads_ffn_and_removed_sub_blocks(tok, tmp_path):
    m = _per_layer(tok)
    out, rep = _export(m, tok, tmp_path)
    r, f, t = _read(out)
    assert rep.arch == "deci" and f["general.architecture"] == "deci"
    assert list(f["deci.attention.head_count"]) == [4, 2, 0, 4]
    assert list(f["deci.attention.head_count_kv"]) == [2, 1, 0, 2]
    assert list(f["deci.feed_forward_length"]) == [128, 64, 128, 32]  # block 3: a zero FFN (see ZERO_FFN)
    assert not any(n.startswith("blk.2.attn") for n in t)
    np.testing.assert_array_equal(_f32(t["blk.3.ffn_down.weight"]), np.zeros((64, 32), np.float32))
    np.testing.assert_array_equal(_f32(t["blk.3.ffn_gate.weight"]), np.zeros((32, 64), np.float32))
    sd = m.state_dict()
    q1, k1 = sd["model.layers.1.self_attn.q_proj.weight"], sd["model.layers.1.self_attn.k_proj.weight"]
    assert q1.shape[0] == 32 and k1.shape[0] == 16
    np.testing.assert_array_equal(_f32(t["blk.1.attn_q.weight"]), _adjacent_pairs(q1, 2).numpy())
    np.testing.assert_array_equal(_f32(t["blk.1.attn_k.weight"]), _adjacent_pairs(k1, 1).numpy())


def test_deci_refuses_a_first_block_without_attention(tok, tmp_path):
    m = _model("llama", tok)
    remove_channels(m, block_parts(m)[1].ffn, range(32))
    m.model.layers[0].self_attn = NoAttention()
    with pytest.raises(ConfigError, match="block 0 has no attention"):
        _export(m, tok, tmp_path)


@pytest.mark.parametrize("quant,qtype", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_weight_types(tok, tmp_path, quant, qtype):
    out, rep = _export(_model("llama", tok), tok, tmp_path, quant)
    r, f, t = _read(out)
    assert t["blk.0.attn_q.weight"].tensor_type.name == qtype and t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert f["general.file_type"] == int(FILE_TYPE[quant])
    if quant == "q8_0":
        w = _model("llama", tok).state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
        back = gguf.quants.dequantize(np.asarray(t["blk.0.ffn_up.weight"].data), gguf.GGMLQuantizationType.Q8_0)
        assert np.abs(back.reshape(w.shape) - w).max() <= np.abs(w).max() / 127  # half a step per block at most


def test_ffn_width_that_a_quant_cannot_hold_is_refused_before_writing(tok, tmp_path):
    m = _model("llama", tok)
    remove_channels(m, block_parts(m)[1].ffn, range(20))  # width 108: not a multiple of 32
    with pytest.raises(ConfigError, match=r"layer 1's FFN width 108 is not a multiple of 32.*--width-multiple 32"):
        _export(m, tok, tmp_path, "q8_0")
    assert not list(tmp_path.iterdir())
    out, rep = _export(m, tok, tmp_path, "q8_0", allow_fallback=True)
    t = _read(out)[2]
    assert t["blk.1.ffn_down.weight"].tensor_type.name == "F16" and t["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"
    assert rep.fallbacks == ["blk.1.ffn_down.weight: rows of 108 not a multiple of 32 -> f16"]


def test_q4_k_m_without_llama_quantize_is_one_line(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match=r"llama-quantize is not built.*python benchmarks/llamacpp.py build"):
        _export(_model("llama", tok), tok, tmp_path, "q4_k_m", allow_fallback=True)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".gguf"]


def test_unsupported_architecture_is_one_line(tok, tmp_path):
    with pytest.raises(ConfigError, match="supports model types llama, qwen2, gemma3_text; this model is 'opt'"):
        _export(tiny_model("opt"), tok, tmp_path)


def test_precheck_reads_the_folder_without_loading(tmp_path):
    from conftest import save_tiny

    save_tiny(tmp_path / "odd", intermediate_size=100)
    with pytest.raises(ConfigError, match="layer 0's FFN width 100 is not a multiple of 32"):
        precheck(tmp_path / "odd", GGUFOptions("q8_0"))
    precheck(tmp_path / "odd", GGUFOptions("f16"))
    tiny_model("opt").save_pretrained(tmp_path / "opt")
    with pytest.raises(ConfigError, match="'opt'"):
        precheck(tmp_path / "opt", GGUFOptions("f32"))


def test_cli_writes_gguf_and_refuses_in_one_line(tmp_path, capsys):
    from conftest import save_tiny
    from prunekit.cli import main

    save_tiny(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--to", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "llama.cpp architecture llama" in capsys.readouterr().out
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.architecture"].contents() == "llama"
    assert main(["export", str(tmp_path / "m"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists; pass --overwrite" in err


# --- llama.cpp itself (skipped unless built) -------------------------------------------------------------------


def _agree(m, tok, path, n=40, tol=0.05):
    ids = torch.randint(0, len(tok), (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits[0].float().numpy()
    got = llamacpp.logits(path, ids[0].numpy())
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert err < tol * np.abs(ref).max()
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * err  # near-ties of a random model may flip within the error
    assert clear.mean() > 0.8 and (got.argmax(-1) == ref.argmax(-1))[clear].all()


@needs_llamacpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "deci", "qwen2-deci"])
def test_llamacpp_logits_equal_pytorch(tok, tmp_path, arch):
    if arch == "deci":
        m = _per_layer(tok)
    elif arch == "qwen2-deci":
        m = _model("qwen2", tok)
        remove_heads(m, block_parts(m)[0].attn, [], [1])
    else:
        m = _model(arch, tok)
    out, rep = _export(m, tok, tmp_path)
    assert rep.arch == arch.split("-")[-1]
    _agree(m, tok, out)


@needs_llamacpp
def test_llamacpp_runs_a_middle_block_without_ffn(tok, tmp_path):
    """A block that keeps its attention but lost its FFN, in the middle of the stack, is written with a zero FFN
    (llama.cpp's deci graph drops the attention output of a layer whose FFN length is 0: docs/deploy.md)."""
    m = _per_layer(tok)
    layer1 = m.model.layers[1]
    remove_channels(m, block_parts(m)[1].ffn, range(64))  # block 1 now has attention but no FFN
    assert layer1.mlp.down_proj.weight.shape[1] == 0
    out, rep = _export(m, tok, tmp_path)
    assert rep.layers[1]["zero_ffn"] and rep.layers[1]["ffn"] == 32
    _agree(m, tok, out)


@pytest.mark.parametrize("kind", ["compressed 2:4", "low rank", "structured per-layer"])
def test_every_saved_format_exports_with_its_weights(tok, tmp_path, kind):
    """A folder in each prunekit format -> load_model -> GGUF: the GGUF holds the weights the loaded model runs."""
    from prunekit import PruneConfig, load_model, prune
    from prunekit.formats import save_folder

    m = _model("llama", tok)
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    if kind == "compressed 2:4":
        prune(m, PruneConfig(method="magnitude", pattern="2:4", sparsity=None), calib=calib)
        save_folder(m, tok, tmp_path / "m", save_format="compressed")
    elif kind == "low rank":
        prune(m, PruneConfig(method="svd", sparsity=0.5), calib=calib)
        save_folder(m, tok, tmp_path / "m")
    else:  # per-block widths: saved in prunekit's structured format
        remove_channels(m, block_parts(m)[1].ffn, range(40))
        remove_heads(m, block_parts(m)[0].attn, [], [0])
        save_folder(m, tok, tmp_path / "m")
        assert (tmp_path / "m" / "prunekit_structured.json").is_file()
    loaded, ltok = load_model(str(tmp_path / "m"))
    out, rep = _export(loaded, ltok, tmp_path)
    t = _read(out)[2]
    sd = loaded.state_dict()
    np.testing.assert_array_equal(_f32(t["blk.1.ffn_down.weight"]), sd["model.layers.1.mlp.down_proj.weight"].numpy())
    if kind == "compressed 2:4":
        w = _f32(t["blk.0.ffn_up.weight"]).reshape(-1, 4)
        assert ((w != 0).sum(1) <= 2).all()
    if kind == "structured per-layer":
        assert rep.arch == "deci" and len({x["ffn"] for x in rep.layers}) > 1


@needs_llamacpp
def test_cli_verify_compares_llamacpp_with_the_model(tmp_path, capsys):
    from conftest import save_tiny
    from prunekit.cli import main

    save_tiny(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--to", "gguf", "--out", str(tmp_path / "m.gguf"), "--verify", "32"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("llama.cpp vs prunekit on 32 tokens: top-1 next token equal at")
