"""Decoder-block discovery and per-architecture facts.

This is the only module that knows where a model keeps its blocks. The model's own declaration
comes first: a Hugging Face model names its decoder-layer class in ``_no_split_modules``, and the
``nn.ModuleList`` holding ``num_hidden_layers`` of them is the decoder stack (this also finds the
text decoder inside a multimodal wrapper whose vision tower is declared too). Models without the
declaration fall back to known paths (``model.layers`` for Llama/Qwen2/Mistral/Gemma,
``model.decoder.layers`` for OPT, ``gpt_neox.layers``, ``transformer.h`` for GPT-2) and then to
the largest ``nn.ModuleList`` of identical modules that contain linear layers.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from torch import nn

from ..errors import ConfigError
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


class UnsupportedModelError(ConfigError):
    """The model's decoder blocks could not be located."""


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _declared_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of the model's declared decoder-layer class (``_no_split_modules``)."""
    declared = set(getattr(model, "_no_split_modules", None) or ())
    if not declared:
        return None
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) and all(type(b).__name__ in declared for b in mod)
             and _has_linears(mod[0])]
    if not found:
        return None
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_layers = getattr(text_cfg, "num_hidden_layers", None)
    exact = [f for f in found if len(f[1]) == n_layers]
    return max(exact or found, key=lambda f: len(f[1]))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_path, blocks)`` of the decoder stack.

    Raises:
        UnsupportedModelError: no list of repeated blocks holding linear layers was found.
    """
    declared = _declared_blocks(model)
    if declared is not None:
        return declared
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


def block_lookup(model: nn.Module) -> Callable[[str], int]:
    """A function mapping a qualified module name (``model.layers.3.mlp.up_proj``) to its block index."""
    path, _ = find_blocks(model)
    prefix = path + "."

    def block_of(name: str) -> int:
        if not name.startswith(prefix):
            raise ValueError(f"{name!r} is not inside the decoder blocks ({path})")
        return int(name[len(prefix):].split(".", 1)[0])

    return block_of


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
