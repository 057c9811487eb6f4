"""The compressed format in the block-streamed pipeline: written block by block while pruning, and read
block by block (tensor by tensor) for streamed evaluation — the same weights and numbers as in memory."""

from __future__ import annotations

import json

import pytest
import torch

from prunekit import PruneConfig, load_model, prune
from prunekit.cli import main
from prunekit.formats import save_folder
from prunekit.formats.compressed_read import MANIFEST, CompressedSource
from prunekit.formats.lazy import LazyModel
from prunekit.streaming import model_bytes_on_disk, open_lazy, prune_streamed
from test_compressed import same_bits


@pytest.mark.parametrize("cfg", [dict(method="magnitude", sparsity=0.5),
                                 dict(method="magnitude", pattern="2:4", sparsity=None),
                                 dict(method="svd", sparsity=0.6)])
def test_streamed_prune_writes_the_in_memory_weights_compressed(tiny3_folder, tmp_path, cfg):
    config = PruneConfig(**cfg)
    model, tok = load_model(str(tiny3_folder))
    prune(model, config)
    lazy, _ = open_lazy(str(tiny3_folder))
    out = tmp_path / "out"
    out.mkdir()
    prune_streamed(lazy, config, out, tok, save_format="compressed")
    tok.save_pretrained(out)
    back, _ = load_model(str(out))
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(same_bits(a[k], b[k]) for k in a)
    man = json.loads((out / MANIFEST).read_text())
    assert not (out / "model.safetensors.index.json").exists() and man["blocks"]["count"] == 3
    assert man["sizes"]["encodings"]["dense"] < len(man["tensors"]) or cfg["method"] == "svd"
    assert bool(man["lowrank"]) == (cfg["method"] == "svd")


def test_a_compressed_folder_streams_tensor_by_tensor(tiny3_folder, tmp_path):
    model, tok = load_model(str(tiny3_folder))
    prune(model, PruneConfig(method="magnitude", sparsity=0.7))
    out, _ = save_folder(model, tok, tmp_path / "c", save_format="compressed")
    lazy = LazyModel(CompressedSource(out), torch.float32)
    lazy.load(exclude=("model.layers.",))
    lazy.load("model.layers.1")
    state = model.state_dict()
    got = lazy.model.model.layers[1].state_dict()
    assert all(same_bits(t, state[f"model.layers.1.{n}"]) for n, t in got.items())
    assert all(p.device.type == "meta" for p in lazy.model.model.layers[0].parameters())
    numel = sum(t.numel() for k, t in state.items() if k != "lm_head.weight" or not model.config.tie_word_embeddings)
    assert model_bytes_on_disk(str(out), "float32") == numel * 4  # the decoded size, not the stored parts


def test_cli_offload_disk_saves_compressed_and_eval_streams_it(tiny3_folder, prose_file, tmp_path, capsys):
    outs = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        assert main(["prune", str(tiny3_folder), "--method", "magnitude", "--sparsity", "0.5",
                     "--eval", str(prose_file), "--eval-seqlen", "32", "--max-windows", "2", "--offload", offload,
                     "--out", str(out), "--save-format", "compressed"]) == 0
        printed = capsys.readouterr().out
        assert "compressed format" in printed and "dense-equivalent" in printed
        report = json.loads((out / "prunekit_report.json").read_text())
        assert report["storage"]["save_format"] == "compressed"
        outs[offload] = report
    a, _ = load_model(str(tmp_path / "none"))
    b, _ = load_model(str(tmp_path / "disk"))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(same_bits(sa[k], sb[k]) for k in sa)
    ppl = {k: r["evaluation"]["pruned"][str(prose_file)]["nll"] for k, r in outs.items()}
    assert ppl["none"] == ppl["disk"]
    evals = {}
    for offload in ("none", "disk"):  # the compressed folder as the model to evaluate
        js = tmp_path / f"eval-{offload}.json"
        assert main(["eval", str(tmp_path / "none"), "--datasets", str(prose_file), "--seqlen", "32",
                     "--max-windows", "2", "--offload", offload, "--json", str(js)]) == 0
        evals[offload] = json.loads(js.read_text())[str(prose_file)]["nll"]
    assert evals["none"] == evals["disk"] == ppl["none"]


@pytest.mark.parametrize("extra, says", [(["--save-format", "compressed"], "drop --save-format compressed"),
                                         (["--offload", "disk"], "needs it in memory")])
def test_structured_refuses_compressed_and_streaming_before_work(tiny3_folder, prose_file, tmp_path, capsys, extra,
                                                                 says):
    out = tmp_path / "o"
    code = main(["prune", str(tiny3_folder), "--method", "flap", "--pattern", "width", "--sparsity", "0.25",
                 "--calib", str(prose_file), "--nsamples", "2", "--seqlen", "32", "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code != 0 and says in err and err.count("\n") == 1
    assert not out.exists() and not any(tmp_path.glob(".o*"))


def test_api_refuses_a_compressed_save_of_a_structured_model(tiny3_folder, tmp_path):
    from prunekit.errors import ConfigError

    model, tok = load_model(str(tiny3_folder))
    prune(model, PruneConfig(method="magnitude", pattern="width", sparsity=0.3))
    with pytest.raises(ConfigError, match="structurally pruned"):
        save_folder(model, tok, tmp_path / "c", save_format="compressed")
    assert not (tmp_path / "c").exists()
    lazy, tok = open_lazy(str(tiny3_folder))
    with pytest.raises(ConfigError, match="cannot stream"):
        prune_streamed(lazy, PruneConfig(method="magnitude", pattern="width", sparsity=0.3), tmp_path / "s", tok)
