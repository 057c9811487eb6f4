"""Decoder-block discovery and per-architecture facts.

This is the only module that knows where a model keeps its blocks (``model.model.layers``
for Llama/Qwen2/Mistral, ``model.decoder.layers`` for OPT, ``gpt_neox.layers``,
``transformer.h`` for GPT-2). Known paths are tried first; otherwise the largest
``nn.ModuleList`` of identical modules that contain linear layers is taken.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from .linear import is_linear

KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi3 (under *ForCausalLM)
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "transformer.blocks",  # MPT
    "model.language_model.layers",  # multimodal wrappers
)

# config attribute names for the longest sequence the model was built for
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class UnsupportedModelError(ValueError):
    """The model's decoder blocks could not be located."""


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_path, blocks)`` of the decoder stack.

    Raises:
        UnsupportedModelError: no list of repeated blocks holding linear layers was found.
    """
    for path in KNOWN_BLOCK_PATHS:
        mod = _get(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) and _has_linears(mod[0]):
            return path, mod
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod) > 0
            and len({type(b) for b in mod}) == 1
            and _has_linears(mod[0])
            and (best is None or len(mod) > len(best[1]))
        ):
            best = (name, mod)
    if best is None:
        raise UnsupportedModelError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
            "repeated blocks with linear layers; prunekit supports Hugging Face causal LMs whose "
            "blocks sit in a ModuleList (e.g. model.layers) — please open an issue with the "
            "model's class name"
        )
    return best


def _has_linears(module: nn.Module) -> bool:
    return any(is_linear(m) for m in module.modules())


def block_linears(
    block: nn.Module,
    prefix: str,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """Linear layers of one block by qualified name, filtered by regexes.

    A name is selected if it matches any ``include`` regex (all, when none are given) and no
    ``exclude`` regex; matching uses ``re.search`` on the full qualified name.
    """
    inc = [re.compile(p) for p in (include or [])]
    exc = [re.compile(p) for p in (exclude or [])]
    out: dict[str, nn.Module] = {}
    for name, mod in block.named_modules():
        if not name or not is_linear(mod):
            continue
        qual = f"{prefix}.{name}"
        if inc and not any(r.search(qual) for r in inc):
            continue
        if any(r.search(qual) for r in exc):
            continue
        out[qual] = mod
    return out


def decoder_linears(
    model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> dict[str, nn.Module]:
    """Every selected linear in every decoder block (never embeddings or the LM head)."""
    path, blocks = find_blocks(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        out.update(block_linears(block, f"{path}.{i}", include, exclude))
    return out


def block_index(qualified_name: str, model: nn.Module) -> int:
    """Index of the decoder block a qualified linear name belongs to."""
    path, _ = find_blocks(model)
    rest = qualified_name[len(path) + 1 :]
    return int(rest.split(".", 1)[0])


def context_length(model: nn.Module) -> int | None:
    """Longest sequence the model's position embeddings allow, if the config says."""
    cfg = getattr(model, "config", None)
    for attr in _CONTEXT_ATTRS:
        val = getattr(cfg, attr, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


def set_module(root: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Replace the submodule at ``qualified_name`` (used by methods that swap modules)."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
