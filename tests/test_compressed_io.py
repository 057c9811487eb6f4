"""The compressed format on disk: lazy per-block reads, size bounds, damaged folders, CLI prune/export."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit.cli import main
from prunekit.formats import REPORT_FILE, save_folder
from prunekit.formats.sizes import weights_bytes
from prunekit.formats import load_model
from prunekit.formats.compressed_read import (MANIFEST, CompressedReader, CorruptCheckpointError, block_file,
                                       load_compressed_model)
from test_compressed import assert_same_model, prune_mixed, same_bits


@pytest.fixture
def folder(tmp_path):
    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok), dtype=torch.bfloat16)
    prune_mixed(model)
    out, _ = save_folder(model, tok, tmp_path / "c", save_format="compressed")
    return out, model


def test_reader_decodes_one_block_from_its_own_shard(folder, monkeypatch):
    out, model = folder
    read = []
    real = CompressedReader._part
    monkeypatch.setattr(CompressedReader, "_part", lambda self, f, key: read.append(f) or real(self, f, key))
    reader = CompressedReader(out)
    one = reader.read(1)
    assert set(read) == {block_file(1)} and one and all(n.startswith("model.layers.1.") for n in one)
    state = model.state_dict()
    assert all(same_bits(t, state[n]) for n, t in one.items())
    read.clear()
    load_compressed_model(out, torch.bfloat16)
    order = [f for i, f in enumerate(read) if i == 0 or read[i - 1] != f]
    assert order == ["prunekit-compressed-rest.safetensors", block_file(0), block_file(1)]  # each once, in order


def test_plain_transformers_refuses_the_folder(folder):
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="model.safetensors|pytorch_model.bin"):
        AutoModelForCausalLM.from_pretrained(folder[0])


def _one_line(e: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and "re-save" in msg and all(w in msg for w in words), msg


def test_missing_shard(folder):
    out, _ = folder
    (out / block_file(1)).unlink()
    with pytest.raises(CorruptCheckpointError) as e:
        load_model(str(out), dtype="bfloat16")
    _one_line(e, block_file(1), "missing")


def test_manifest_names_a_tensor_the_shard_lacks(folder):
    from safetensors.torch import load_file, save_file

    out, _ = folder
    shard = out / block_file(0)
    parts = load_file(shard)
    gone = next(k for k in parts if k.endswith(":values"))
    save_file({k: v for k, v in parts.items() if k != gone}, shard)
    with pytest.raises(CorruptCheckpointError) as e:
        load_model(str(out), dtype="bfloat16")
    _one_line(e, block_file(0), gone)


def _edit_manifest(out, edit, sums: dict | None = None) -> None:
    """Edit the manifest and re-seal it (with ``sums`` updated): the checks behind the checksums, which
    a hand edit meets first (tests/test_integrity.py), still hold for a writer that got it wrong."""
    from prunekit.formats import checksum

    man = json.loads((out / MANIFEST).read_text())
    edit(man)
    (out / MANIFEST).write_text(json.dumps(checksum.seal(man, {**man["integrity"]["tensors"], **(sums or {})})))


@pytest.mark.parametrize("how", ["encoded", "dense", "config"])
def test_bad_shapes(folder, how):
    out, _ = folder
    name = {"encoded": "model.layers.1.self_attn.v_proj.weight", "dense": "model.layers.0.self_attn.q_proj.weight",
            "config": "model.norm.weight"}[how]

    def edit(man):
        e = man["tensors"][name]
        assert (e["encoding"] == "dense") == (how != "encoded")
        e["shape"] = [e["shape"][0], e["shape"][1] * 2] if len(e["shape"]) == 2 else [e["shape"][0] + 1]

    sums = {}
    if how == "config":  # a consistent manifest and shard that do not fit config.json
        from safetensors.torch import load_file, save_file

        from prunekit.formats.checksum import tensor_checksum

        shard = out / "prunekit-compressed-rest.safetensors"
        parts = load_file(shard)
        parts[name] = torch.cat([parts[name], parts[name][:1]])
        save_file(parts, shard)
        sums[name] = tensor_checksum(parts[name])
    _edit_manifest(out, edit, sums)
    with pytest.raises(CorruptCheckpointError) as e:
        load_model(str(out), dtype="bfloat16")
    _one_line(e, "prunekit-compressed-rest" if how == "config" else block_file(int(name.split(".")[2])), name)


def test_truncated_shard_and_bad_manifest(folder, tmp_path):
    out, _ = folder
    shard = out / block_file(1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as e:
        load_model(str(out), dtype="bfloat16")
    _one_line(e, block_file(1))
    _edit_manifest(out, lambda man: man["tensors"].pop("model.norm.weight"))
    with pytest.raises(CorruptCheckpointError) as e:
        load_model(str(out), dtype="bfloat16")
    _one_line(e, MANIFEST, "model.norm.weight")
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(CorruptCheckpointError) as e:
        load_model(str(out), dtype="bfloat16")
    _one_line(e, MANIFEST)
    assert main(["export", str(out), "--out", str(tmp_path / "x")]) == 2  # the CLI prints it as one line


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)])
def test_size_bounds_bf16(tmp_path, pattern, sparsity):
    """Issue 15: unstructured s in bf16 <= (1 - s) dense + 1 bit per weight + 2 %; 2:4 <= 0.6 dense."""
    import prunekit

    model = tiny_model("llama", dtype=torch.bfloat16, hidden_size=256, intermediate_size=768, num_attention_heads=4)
    prunekit.prune(model, prunekit.PruneConfig(method="magnitude", sparsity=sparsity, pattern=pattern))
    model.save_pretrained(tmp_path / "dense")
    save_folder(model, None, tmp_path / "c", save_format="compressed")
    dense, comp = weights_bytes(tmp_path / "dense"), weights_bytes(tmp_path / "c")
    weights = [t for t in model.state_dict().values() if t.is_floating_point()]
    numel = sum(t.numel() for t in weights)
    s = sum(int((t == 0).sum()) for t in weights) / numel  # over every stored weight, embeddings included
    if pattern == "2:4":
        assert comp <= 0.6 * dense
    else:
        assert s > sparsity * 0.9 and comp <= (1 - s) * dense + numel / 8 + 0.02 * dense
    assert comp < dense


def test_cli_prune_compressed_gives_the_same_model(tiny_folder, tmp_path, data_dir, capsys, calib_ids):
    args = ["prune", str(tiny_folder), "--method", "magnitude", "--sparsity", "0.6", "--eval"]
    assert main([*args, "--out", str(tmp_path / "dense")]) == 0
    assert main([*args, "--out", str(tmp_path / "comp"), "--save-format", "compressed"]) == 0
    printed = capsys.readouterr().out
    assert "prunekit.load_model" in printed and "dense-equivalent" in printed
    dense, _ = load_model(str(tmp_path / "dense"))
    comp, _ = load_model(str(tmp_path / "comp"))
    assert_same_model(dense, comp, calib_ids[:2])
    st = json.loads((tmp_path / "comp" / REPORT_FILE).read_text())["storage"]
    st_dense = json.loads((tmp_path / "dense" / REPORT_FILE).read_text())["storage"]
    assert st["save_format"] == "compressed" and st_dense["save_format"] == "dense"
    assert st["weights_bytes"] == weights_bytes(tmp_path / "comp") < st_dense["weights_bytes"]
    assert st["dense_equivalent_bytes"] == st_dense["dense_equivalent_bytes"]


def test_cli_export_both_ways_keeps_weights_and_dtype(tmp_path, calib_ids):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok), dtype=torch.bfloat16, tie_word_embeddings=True)
    prune_mixed(model)
    src, _ = save_folder(model, tok, tmp_path / "c", save_format="compressed")
    assert main(["export", str(src), "--out", str(tmp_path / "dense")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()
    assert_same_model(model, plain, calib_ids[:2])
    assert main(["export", str(tmp_path / "dense"), "--save-format", "compressed", "--out", str(tmp_path / "c2")]) == 0
    again, _ = load_model(str(tmp_path / "c2"), dtype="bfloat16")
    assert_same_model(model, again, calib_ids[:2])
    assert json.loads((tmp_path / "c2" / MANIFEST).read_text())["dtype"] == "bfloat16"
