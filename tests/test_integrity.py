"""Saved folders are checked on load: a flipped byte, reordered mask bits or an edited manifest in the
compressed, structured or low-rank format fail in one line naming the tensor and the file (issue 27,
fix 1); a folder saved before checksums existed still loads, with a warning."""

from __future__ import annotations

import json
import logging
import struct

import pytest

from conftest import tiny_model, tiny_tokenizer
from prunekit.cli import main
from prunekit.errors import ConfigError
from prunekit.formats import save_folder
from prunekit.formats import load_model
from prunekit.formats.compressed_read import MANIFEST as COMPRESSED, block_file
from test_compressed import prune_mixed


def _header(f):
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), 8 + n


def damage(f, key, edit) -> None:
    """Replace the bytes of tensor ``key`` in the safetensors file ``f`` by ``edit(bytes)`` (same length)."""
    header, base = _header(f)
    start, end = header[key]["data_offsets"]
    raw = bytearray(f.read_bytes())
    new = edit(bytes(raw[base + start:base + end]))
    assert len(new) == end - start and new != raw[base + start:base + end]
    raw[base + start:base + end] = new
    f.write_bytes(raw)


def flip(b: bytes, at: int = 0) -> bytes:
    """One bit of byte ``at`` flipped."""
    return b[:at] + bytes([b[at] ^ 0x10]) + b[at + 1:]


def _one_line(e, *words) -> str:
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


@pytest.fixture
def compressed(tmp_path):
    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok))
    prune_mixed(model)
    out, _ = save_folder(model, tok, tmp_path / "c", save_format="compressed")
    return out


def _first(f, suffix: str) -> str:
    return next(k for k in _header(f)[0] if k.endswith(suffix) and k != "__metadata__")


@pytest.mark.parametrize("how", ["mask bytes reversed", "value bit", "dense tensor bit", "norm bit"])
def test_damaged_compressed_tensor_is_named(compressed, how):
    block = compressed / block_file(0)
    rest = compressed / "prunekit-compressed-rest.safetensors"
    if how == "mask bytes reversed":  # the same set bits, so the counts still agree: only a checksum sees it
        f, key, edit = block, _first(block, ":mask"), lambda b: b[::-1]
    elif how == "value bit":
        f, key, edit = block, _first(block, ":values"), lambda b: flip(b, 3)
    elif how == "dense tensor bit":
        f, key, edit = rest, "lm_head.weight", lambda b: flip(b, 3)
    else:
        f, key, edit = block, "model.layers.0.input_layernorm.weight", lambda b: flip(b, 3)
    damage(f, key, edit)
    with pytest.raises(ConfigError) as e:
        load_model(str(compressed))
    _one_line(e, str(f), repr(key), "damaged")


def test_transposed_edited_into_the_manifest_is_caught(compressed):
    man = json.loads((compressed / COMPRESSED).read_text())
    name = next(n for n, e in man["tensors"].items() if e["encoding"] != "dense" and e["shape"][0] == e["shape"][1])
    man["tensors"][name]["transposed"] = True  # a square weight: every shape check still passes
    (compressed / COMPRESSED).write_text(json.dumps(man, indent=1))
    with pytest.raises(ConfigError) as e:
        load_model(str(compressed))
    _one_line(e, str(compressed / COMPRESSED), "edited or damaged")


def test_cli_eval_of_a_damaged_folder_is_one_line(compressed, tmp_path, capsys):
    damage(compressed / "prunekit-compressed-rest.safetensors", "lm_head.weight", lambda b: flip(b, 3))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    rc = main(["eval", str(compressed), "--datasets", str(text), "--seqlen", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "'lm_head.weight' is damaged" in err[-1]


def test_folder_saved_before_checksums_loads_with_a_warning(compressed, caplog):
    man = json.loads((compressed / COMPRESSED).read_text())
    del man["integrity"]
    (compressed / COMPRESSED).write_text(json.dumps(man))
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        model, _ = load_model(str(compressed))
    assert any("has no checksums" in r.getMessage() and str(compressed) in r.getMessage() for r in caplog.records)
    assert model is not None


def test_compressed_checksums_cover_every_stored_part(compressed):
    man = json.loads((compressed / COMPRESSED).read_text())
    keys = set()
    for f in {e["file"] for e in man["tensors"].values()}:
        keys |= set(_header(compressed / f)[0]) - {"__metadata__"}
    assert man["integrity"]["algorithm"] == "crc32" and set(man["integrity"]["tensors"]) == keys


# ------------------------------------------------------------------ structured and low-rank formats

@pytest.fixture
def structured(tmp_path):
    from prunekit import PruneConfig, prune
    from prunekit.formats import save_compressed
    from prunekit.formats.structured import PRUNEKIT
    from test_structured import _ids, arch_model

    model = arch_model("llama")
    prune(model, PruneConfig(method="flap", pattern="width", sparsity=0.25, allocation="owl",
                             method_options={"multiple": 8}), calib=_ids())
    out, how = save_compressed(model, tiny_tokenizer(128), tmp_path / "s")
    assert how.startswith(PRUNEKIT)
    return out


@pytest.fixture
def lowrank(tmp_path):
    from prunekit.calibration import run_sequential
    from prunekit.formats.lowrank import save_lowrank
    from prunekit.methods import Target, build_method
    from prunekit.models import decoder_linears

    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok))
    run_sequential(model, None, build_method("welore"), {n: Target(0.5) for n in decoder_linears(model)})
    return save_lowrank(model, tok, tmp_path / "lr")


@pytest.mark.parametrize("fmt", ["structured", "lowrank"])
def test_damaged_structured_and_lowrank_weights_are_named(fmt, structured, lowrank):
    folder = structured if fmt == "structured" else lowrank
    f = folder / f"prunekit_{fmt}.safetensors"
    key = "model.layers.1.mlp.down_proj.weight" if fmt == "structured" else "model.layers.1.mlp.down_proj.up.weight"
    load_model(str(folder))  # loads before the damage
    damage(f, key, lambda b: flip(b, 5))
    with pytest.raises(ConfigError) as e:
        load_model(str(folder))
    _one_line(e, str(f), repr(key), "damaged")


@pytest.mark.parametrize("fmt", ["structured", "lowrank"])
def test_edited_structured_and_lowrank_manifests_are_caught(fmt, structured, lowrank):
    folder = structured if fmt == "structured" else lowrank
    f = folder / f"prunekit_{fmt}.json"
    man = json.loads(f.read_text())
    if fmt == "structured":
        spec = man["linears"]["model.layers.0.mlp.down_proj"]
        spec["bias"] = not spec["bias"]
    else:
        man["modules"]["model.layers.0.mlp.down_proj"]["bias"] = True
    f.write_text(json.dumps(man, indent=2))
    with pytest.raises(ConfigError) as e:
        load_model(str(folder))
    _one_line(e, str(f), "edited or damaged")


def test_streamed_lowrank_shards_are_checked(tmp_path):
    """The block-streamed writer's low-rank shards (``ShardWriter``) carry checksums too."""
    from prunekit.calibration import run_sequential
    from prunekit.methods import Target, build_method
    from prunekit.models import decoder_linears, find_blocks
    from prunekit.formats.shards import ShardWriter, outside_blocks

    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok))
    run_sequential(model, None, build_method("welore"), {n: Target(0.5) for n in decoder_linears(model)})
    folder = tmp_path / "lr"
    folder.mkdir()
    path, blocks = find_blocks(model)
    writer = ShardWriter(folder, path)
    for i, block in enumerate(blocks):
        writer.write_block(i, block)
    writer.write_tensors(outside_blocks(model, path))
    writer.finish(model)
    tok.save_pretrained(folder)
    load_model(str(folder))
    shard = sorted(folder.glob("prunekit_lowrank-*.safetensors"))[0]
    key = next(k for k in _header(shard)[0] if k.endswith("up.weight"))
    damage(shard, key, lambda b: flip(b, 1))
    with pytest.raises(ConfigError) as e:
        load_model(str(folder))
    _one_line(e, str(shard), repr(key), "damaged")
