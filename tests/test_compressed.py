"""The compressed checkpoint format: exact codecs, per-tensor choice, bit-identical folder round trips."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import tiny_model, tiny_tokenizer
from prunekit.formats import codec
from prunekit.masks import nm_mask
from prunekit.methods import apply_keep_mask
from prunekit.models import decoder_linears, weight_view

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equal bits, not merely equal values (-0.0 != +0.0 here)."""
    return t.detach().contiguous().view(torch.uint8) if t.is_floating_point() else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def sparse(shape, s: float, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return w.masked_fill(torch.rand(shape, generator=g) < s, 0.0).to(dtype)


def nm(shape, n: int, m: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return w.masked_fill(~nm_mask(w.abs(), n, m), 0.0).to(dtype)


def roundtrip(w: torch.Tensor) -> tuple[codec.Encoded, torch.Tensor]:
    enc = codec.encode(w)
    return enc, codec.decode(enc.encoding, enc.parts, tuple(w.shape), w.dtype, enc.meta)


# ---------------------------------------------------------------- codec


def test_bit_packing_layout_is_little_endian_row_major():
    packed = codec.pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool))
    assert packed.tolist() == [0b00000001, 0b00000011]
    assert codec.unpack_bits(packed, 10).tolist() == [True] + [False] * 7 + [True, True]
    # 2-bit indices 3, 1, 2: bits 1,1 | 1,0 | 0,1 -> 0b100111
    assert codec.pack_indices(torch.tensor([3, 1, 2]), 2).tolist() == [0b100111]
    assert codec.unpack_indices(torch.tensor([0b100111], dtype=torch.uint8), 3, 2).tolist() == [3, 1, 2]
    assert [codec.index_bits(m) for m in (2, 4, 8, 16, 3)] == [1, 2, 3, 4, 2]


def test_hand_built_nm_and_bitmask_parts():
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    enc = codec.encode_nm(w, 2, 4, with_signs=False)  # group 2 has one non-zero: filled with its first zero
    assert enc.parts["values"].tolist() == [[[1.5, -2.0], [3.0, 0.0]]]
    assert codec.unpack_indices(enc.parts["indices"], 4, 2).tolist() == [1, 3, 0, 1]
    bm = codec.encode_bitmask(w, with_signs=False)
    assert bm.parts["values"].tolist() == [1.5, -2.0, 3.0] and bm.parts["mask"].tolist() == [0b00011010]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.7, 0.99, 1.0])
def test_unstructured_roundtrip_is_bit_exact_and_small(s, dtype):
    w = sparse((48, 96), s, dtype)
    enc, back = roundtrip(w)
    assert same_bits(back, w)
    nnz, es = int((w != 0).sum()), w.element_size()
    if s == 0.0:
        assert enc.encoding == "dense"  # a dense layer stays dense (a mask would only add a bit per weight)
    assert enc.nbytes <= min(w.numel() * es, nnz * es + (w.numel() + 7) // 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (2, 8), (1, 2)])
def test_nm_roundtrip_is_bit_exact(n, m, dtype):
    w = nm((32, 64), n, m, dtype)
    enc, back = roundtrip(w)
    assert same_bits(back, w)
    values_bytes = w.numel() * n // m * w.element_size()
    assert enc.nbytes <= values_bytes + w.numel() // 8  # never worse than values + 1 bit per weight
    if (n, m) in [(2, 4), (1, 4), (1, 2), (2, 8)]:  # the indices cost <= 1 bit per weight: N:M layout
        assert (enc.encoding, enc.meta["n"], enc.meta["m"]) == ("nm", n, m)
        assert enc.parts["values"].numel() * m == w.numel() * n
    if (n, m) == (4, 8):  # 3-bit indices: 1.5 bits per weight against the mask's 1
        assert enc.encoding == "bitmask"


def test_two_four_uses_two_bit_indices():
    w = nm((16, 32), 2, 4, torch.bfloat16)
    enc = codec.encode(w)
    assert (enc.encoding, enc.meta["n"], enc.meta["m"], enc.meta["index_bits"]) == ("nm", 2, 4, 2)
    assert enc.parts["indices"].numel() == 16 * 32 // 4 * 2 * 2 // 8


def test_a_layer_that_is_not_nm_is_not_encoded_as_nm():
    w = nm((16, 32), 2, 4)
    w[3, 4:8] = torch.tensor([0.5, 1.0, 0.25, 0.0])  # one group of 128 holds three non-zeros
    enc, back = roundtrip(w)
    assert same_bits(back, w)
    assert not (enc.encoding == "nm" and enc.meta["n"] == 2)
    sizes = codec.encoded_sizes(w)
    assert all(not (k == "nm" and p["n"] < 3 and p["m"] == 4) for _, k, p in sizes)


def test_mixed_groups_below_n_keep_zeros_exactly():
    w = nm((8, 16), 2, 4)
    w[:, :4] = 0.0  # whole groups of zeros, and groups with one non-zero
    w[0, 8:12] = torch.tensor([0.0, 0.0, 7.0, 0.0])
    enc = codec.encode_nm(w, 2, 4, with_signs=False)  # (encode() would pick the bitmask here: fewer values)
    assert same_bits(codec.decode("nm", enc.parts, (8, 16), torch.float32, enc.meta), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bitmask", "nm"])
def test_negative_zeros_survive(kind, dtype):
    w = sparse((16, 32), 0.5, dtype) if kind == "bitmask" else nm((16, 32), 1, 4, dtype)
    neg = (w == 0) & (torch.arange(w.numel()).view_as(w) % 3 == 0)
    w = w.masked_fill(neg, -0.0)
    assert bool(torch.signbit(w[neg]).all())
    enc, back = roundtrip(w)
    assert enc.encoding == kind and "signs" in enc.parts and same_bits(back, w)


def test_decode_rejects_inconsistent_parts():
    enc = codec.encode(sparse((8, 16), 0.5))
    with pytest.raises(codec.CodecError, match="set bits"):
        codec.decode("bitmask", {**enc.parts, "values": enc.parts["values"][:-1]}, (8, 16), torch.float32)
    with pytest.raises(codec.CodecError, match="uint8 bytes"):
        codec.decode("bitmask", enc.parts, (8, 24), torch.float32)
    e24 = codec.encode(nm((4, 8), 2, 4))
    bad = codec.pack_indices(torch.tensor([1, 1] * 8), 2)  # repeated position in a group
    with pytest.raises(codec.CodecError, match="increasing"):
        codec.decode("nm", {**e24.parts, "indices": bad}, (4, 8), torch.float32, e24.meta)


def test_pruning_writes_positive_zeros():
    lin = nn.Linear(16, 8)
    keep = lin.weight.detach().abs() > 0.1
    apply_keep_mask(lin, keep)
    pruned = lin.weight.detach()[~keep]
    assert pruned.numel() and not bool(torch.signbit(pruned).any())  # +0.0: nothing for the format to store


# ---------------------------------------------------------------- folders


def prune_mixed(model: nn.Module, seed: int = 0) -> None:
    """Per-layer variety: dense, unstructured 0..0.99, 2:4, 4:8, 1:4 and 3:4 (mixed N:M)."""
    g = torch.Generator().manual_seed(seed)
    kinds = ["dense", 0.99, "2:4", 0.5, "4:8", "1:4", 0.3, "3:4"]
    for i, lin in enumerate(decoder_linears(model).values()):
        w = weight_view(lin)
        kind = kinds[i % len(kinds)]
        with torch.no_grad():
            if isinstance(kind, float):
                w.masked_fill_(torch.rand(w.shape, generator=g) < kind, 0.0)
            elif kind != "dense":
                n, m = map(int, kind.split(":"))
                w.masked_fill_(~nm_mask(w.float().abs(), n, m), 0.0)


def assert_same_model(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not same_bits(sa[k], sb[k])]
    assert not bad, bad[:3]
    with torch.inference_mode():
        assert torch.equal(a(ids).logits, b(ids).logits)


def save_load(model, tmp_path, tok=None, dtype=None):
    import prunekit
    from prunekit.formats import save_folder

    out, how = save_folder(model, tok, tmp_path / "c", {"note": "test"}, save_format="compressed")
    assert "prunekit.load_model" in how and "dense-equivalent" in how
    if tok is not None:
        back, _ = prunekit.load_model(str(out), dtype=dtype or model.dtype)
    else:
        from prunekit.formats.compressed_read import load_compressed_model

        back = load_compressed_model(out, dtype or model.dtype)
    return out, back


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama_folder_roundtrip_every_dtype(tmp_path, dtype, calib_ids):
    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok), dtype=dtype)
    prune_mixed(model)
    out, back = save_load(model, tmp_path, tok)
    assert_same_model(model, back, calib_ids[:2])
    man = json.loads((out / "prunekit_compressed.json").read_text())
    enc = {e["encoding"] for e in man["tensors"].values()}
    assert enc == {"dense", "bitmask", "nm"}
    assert {(e["n"], e["m"]) for e in man["tensors"].values() if e["encoding"] == "nm"} >= {(2, 4), (1, 4)}
    assert not (out / "model.safetensors").exists() and (out / "prunekit-compressed-block-00001.safetensors").is_file()
    report = json.loads((out / "prunekit_report.json").read_text())["storage"]
    assert report["save_format"] == "compressed" and report["weights_bytes"] < report["dense_equivalent_bytes"]


def test_gpt2_conv1d_and_tied_embeddings(tmp_path, calib_ids):
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    prune_mixed(model)
    out, back = save_load(model, tmp_path)
    assert_same_model(model, back, calib_ids[:2])
    assert back.lm_head.weight is back.transformer.wte.weight  # still one tensor, stored once
    man = json.loads((out / "prunekit_compressed.json").read_text())
    assert man["tied"] == {"lm_head.weight": "transformer.wte.weight"} and "lm_head.weight" not in man["tensors"]
    conv = {n: e for n, e in man["tensors"].items() if e["encoding"] != "dense" and e["transposed"]}
    assert {e["encoding"] for e in conv.values()} == {"bitmask", "nm"}  # Conv1D [in, out]: groups along in
    assert man["tensors"]["transformer.h.0.attn.c_attn.weight"]["shape"] == [64, 192]


def test_tied_llama_and_untouched_model(tmp_path, calib_ids):
    model = tiny_model("llama", tie_word_embeddings=True, dtype=torch.bfloat16)
    out, back = save_load(model, tmp_path)  # nothing pruned: every tensor stays dense
    assert_same_model(model, back, calib_ids[:2])
    assert back.lm_head.weight is back.model.embed_tokens.weight
    man = json.loads((out / "prunekit_compressed.json").read_text())
    assert {e["encoding"] for e in man["tensors"].values()} == {"dense"}


def test_lowrank_model_with_sparse_linears(tmp_path, calib_ids):
    from prunekit.calibration import run_sequential
    from prunekit.methods import Target, build_method
    from prunekit.models.lowrank import LowRankLinear, lowrank_modules

    model = tiny_model("llama", tie_word_embeddings=True)
    linears = decoder_linears(model)
    run_sequential(model, None, build_method("svd"), {n: Target(0.6) for n in linears if "mlp" in n})
    run_sequential(model, None, build_method("magnitude"), {n: Target(0.5) for n in linears if "self_attn" in n})
    assert lowrank_modules(model)
    out, back = save_load(model, tmp_path)
    assert_same_model(model, back, calib_ids[:2])
    ranks = {n: m.rank for n, m in lowrank_modules(model).items()}
    assert {n: m.rank for n, m in lowrank_modules(back).items()} == ranks
    assert all(isinstance(m, LowRankLinear) for m in lowrank_modules(back).values())
    man = json.loads((out / "prunekit_compressed.json").read_text())
    assert man["tensors"]["model.layers.0.self_attn.q_proj.weight"]["encoding"] == "bitmask"
    assert man["tensors"]["model.layers.0.mlp.up_proj.up.weight"]["encoding"] == "dense"


def test_other_dtype_casts_like_from_pretrained(tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    prune_mixed(model)
    _, back = save_load(model, tmp_path, dtype=torch.float32)
    sa, sb = model.state_dict(), back.state_dict()
    assert all(sb[k].dtype == torch.float32 and torch.equal(sb[k], sa[k].float()) for k in sa)
