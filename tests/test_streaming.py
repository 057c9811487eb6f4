"""Block-streamed compression and evaluation: the same weights and numbers as in memory, one block
of weights in memory at a time."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny
from prunekit import EvalConfig, PruneConfig, evaluate, load_model, prune
from prunekit.cli import main
from prunekit.formats.lazy import LazyModel, SafetensorsSource
from prunekit.streaming import open_lazy, prune_streamed


def _calib(tok, text, n=4, seqlen=32):
    from prunekit.data import calibration_ids
    from prunekit.config import CalibConfig

    return calibration_ids(CalibConfig(str(text), nsamples=n, seqlen=seqlen), tok)


@pytest.mark.parametrize("cfg", [
    dict(method="wanda", sparsity=0.5),
    dict(method="sparsegpt", pattern="2:4", sparsity=None),
    dict(method="wanda", sparsity=0.6, allocation="owl"),
    dict(method="magnitude", sparsity=0.6, allocation="alpha", allocation_options={"cache": False}),
    dict(method="wanda", sparsity=0.5, refine="dsnot", refine_options={"skip": ""}),
    dict(method="svd-llm", sparsity=0.5),
    dict(method="welore", sparsity=0.4),
])
def test_streamed_prune_gives_the_in_memory_weights_bit_for_bit(tiny3_folder, prose_file, tmp_path, cfg):
    config = PruneConfig(**cfg, calib={"batch_size": 2})
    model, tok = load_model(str(tiny3_folder))
    ids = _calib(tok, prose_file)
    prune(model, config, calib=ids)
    lazy, _ = open_lazy(str(tiny3_folder))
    out = tmp_path / "out"
    out.mkdir()
    report = prune_streamed(lazy, config, out, tok, calib=ids)
    tok.save_pretrained(out)
    streamed, _ = load_model(str(out))  # a plain sharded HF folder, or the low-rank format
    a, b = model.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report.extra["streamed"] and len(report.layers) == 21


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_folder_holds_one_shard_per_block_and_the_lm_head_once(tmp_path, tied):
    folder = save_tiny(tmp_path / "tiny", num_hidden_layers=3, tie_word_embeddings=tied)
    lazy, tok = open_lazy(str(folder))
    out = tmp_path / "out"
    out.mkdir()
    prune_streamed(lazy, PruneConfig(method="magnitude", sparsity=0.5), out, tok)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = 4 if tied else 5  # blocks, the rest, and an untied LM head on its own (never held with the embeddings)
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(load_file(out / shards[1])) == {k for k in index["weight_map"] if k.startswith("model.layers.1.")}
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    if not tied:
        assert set(load_file(out / shards[-1])) == {"lm_head.weight"}
    tok.save_pretrained(out)
    model, _ = load_model(str(out))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("arch, tied", [("llama", True), ("llama", False), ("qwen2", False), ("gemma3", True),
                                        ("gemma2", False)])
def test_streamed_perplexity_equals_the_in_memory_perplexity(tmp_path, prose_file, monkeypatch, arch, tied):
    import prunekit.eval.streamed as streamed

    folder = save_tiny(tmp_path / arch, arch, tie_word_embeddings=tied)  # gemma: 4 blocks, mixed attention
    model, tok = load_model(str(folder))
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    want = evaluate(model, tok, EvalConfig((str(prose_file),), seqlen=32, max_windows=5,
                                           batch_size=2))[str(prose_file)]
    lazy = LazyModel(SafetensorsSource(folder), torch.float32)
    walks = []
    real = streamed._walk
    monkeypatch.setattr(streamed, "_walk", lambda *a: walks.append(1) or real(*a))
    monkeypatch.setattr(streamed, "BUDGET", 2 * 32 * 64 * 4 * 2)  # two windows' hidden states per walk
    got = evaluate(lazy.model, tok, EvalConfig((str(prose_file),), seqlen=32, max_windows=5,
                                               batch_size=2))[str(prose_file)]
    assert got.nll == want.nll and got.windows == 5 and len(walks) == 3
    assert torch.is_grad_enabled()  # the streamed generator's forward context exited in order


def test_only_one_block_is_resident_at_a_time(tiny3_folder, prose_file, tmp_path, monkeypatch):
    from prunekit.calibration.spill import SpilledTensors

    spilled = []
    monkeypatch.setattr(SpilledTensors, "append", lambda self, t, real=SpilledTensors.append: (spilled.append(t.shape),
                                                                                               real(self, t)))
    lazy, tok = open_lazy(str(tiny3_folder))
    seen = []

    def on_block(ev):
        seen.append([i for i in range(3) if lazy.loaded(f"model.layers.{i}")])

    out = tmp_path / "out"
    out.mkdir()
    prune_streamed(lazy, PruneConfig(method="wanda", sparsity=0.5), out, tok, calib=_calib(tok, prose_file),
                   callback=on_block)
    assert seen == [[], [], []]  # each block was released as soon as it was written
    assert all(p.device.type == "meta" for p in lazy.model.model.layers.parameters())
    assert spilled  # the calibration activations lived on disk, not in memory
    assert sorted(p.name for p in out.iterdir() if "activations" in p.name) == []


def test_cli_offload_disk_end_to_end(tiny3_folder, prose_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prune", str(tiny3_folder), "--method", "wanda", "--calib", str(prose_file), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(prose_file), "--eval-seqlen", "32", "--max-windows", "3",
            "--offload", "disk", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "streaming" in printed and "saved to" in printed
    report = json.loads((out / "prunekit_report.json").read_text())
    assert report["extra"]["offload"] == "disk" and report["summary"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "the quick brown", "answer": "fox"}\n')
    assert main(argv[:-2] + ["--out", str(tmp_path / "o2"), "--tasks", f"qa:{qa}"]) == 2
    assert "generate text token by token, which needs the whole model in memory" in capsys.readouterr().err
    assert main(argv[:-2] + ["--tasks", f"qa:{qa}"]) == 2  # no --out at all
    assert "give --out" in capsys.readouterr().err


def test_cli_eval_streams_perplexity_and_multiple_choice_with_the_in_memory_numbers(tiny3_folder, prose_file, tmp_path,
                                                                                     capsys):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"context": c, "choices": ["fox", "dog", "truth"], "label": i % 3})
                            for i, c in enumerate(["the quick brown", "the lazy", "It is a", "universally"])) + "\n")
    outs = {}
    for mode in ("none", "disk"):
        js = tmp_path / f"{mode}.json"
        assert main(["eval", str(tiny3_folder), "--datasets", str(prose_file), "--seqlen", "32", "--max-windows", "3",
                     "--tasks", f"mc:{mc}", "--offload", mode, "--json", str(js)]) == 0
        outs[mode] = json.loads(js.read_text())
    assert outs["disk"][str(prose_file)]["nll"] == outs["none"][str(prose_file)]["nll"]
    a, b = outs["none"]["tasks"][f"mc:{mc}"], outs["disk"]["tasks"][f"mc:{mc}"]
    assert a["metrics"] == b["metrics"]
    for s1, s2 in zip(a["samples"], b["samples"]):
        assert s1["loglikelihoods"] == pytest.approx(s2["loglikelihoods"], abs=2e-4)  # padding: batched differently
    assert "streaming" in capsys.readouterr().out
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "the quick brown", "answer": "fox"}\n')
    assert main(["eval", str(tiny3_folder), "--tasks", f"qa:{qa}", "--offload", "disk"]) == 2
    assert "generate text token by token" in capsys.readouterr().err
