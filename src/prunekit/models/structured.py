"""prunekit's folder format for structurally pruned models a stock config cannot describe, and its loader.

A model whose blocks have *different* widths (non-uniform allocation, some FFNs dropped) or a
shape no config field expresses (heads removed from GPT-2/OPT/GPT-NeoX, whose configs derive the
head size from ``hidden_size / num_heads``; a bias added where the config has no switch for it)
is saved as:

* ``config.json`` — the model's config (block count and per-layer lists already reduced);
* :data:`MANIFEST` — every decoder linear's class, shape and bias, and the attention/FFN
  attributes the forward reads (``num_key_value_groups``, ``num_heads``, ``split_size`` …);
* :data:`WEIGHTS` — the state dict (not ``model.safetensors``: plain transformers refuses the
  folder instead of silently re-initialising mismatched weights);
* the manifest's ``integrity`` entry (:mod:`prunekit.formats.checksum`): the CRC-32 of every
  tensor and of the manifest, checked while the weights are read.

:func:`load_structured_model` builds the architecture from the config, replaces every linear whose
recorded shape differs by a new, smaller one (no padding, no masks), sets the attributes and loads
the weights strictly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..formats import checksum
from .blocks import decoder_linears, set_module
from .linear import _is_conv1d, weight_view
from .shrink import HEAD_ATTRS, new_linear_like, plain_linear, set_attributes
from .structure import block_parts

log = logging.getLogger(__name__)

MANIFEST = "prunekit_structured.json"
WEIGHTS = "prunekit_structured.safetensors"
FORMAT = "prunekit-structured"


def linear_specs(model: nn.Module) -> dict[str, dict]:
    """Class, ``[out, in]`` shape and bias of every decoder linear."""
    out = {}
    for name, mod in decoder_linears(model).items():
        o, i = weight_view(mod).shape
        out[name] = {"type": "Conv1D" if _is_conv1d(mod) else "Linear", "out": int(o), "in": int(i),
                     "bias": getattr(mod, "bias", None) is not None}
    return out


def attribute_specs(model: nn.Module) -> dict[str, dict]:
    """The integer attributes of attention and FFN modules that a forward may read."""
    out = {}
    for bp in block_parts(model):
        for part, keys in ((bp.attn, HEAD_ATTRS), (bp.ffn, ("intermediate_size",))):
            if part is None:
                continue
            mod = model.get_submodule(part.module)
            vals = {k: getattr(mod, k) for k in keys if isinstance(getattr(mod, k, None), int)
                    and not isinstance(getattr(mod, k), bool)}
            if vals:
                out[part.module] = vals
    return out


def manifest(model: nn.Module) -> dict:
    return {"format": FORMAT, "version": 1, "linears": linear_specs(model), "attributes": attribute_specs(model)}


def is_structured_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    f = Path(path) / MANIFEST
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise checksum.IntegrityError(f"{f}: unreadable manifest ({e}); save the folder again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("linears"), dict):
        raise ConfigError(f"{f} is not a prunekit structured manifest (format {data.get('format')!r}); "
                          "was the folder written by another tool?")
    return data


def rebuild(model: nn.Module, data: dict, dtype: torch.dtype | None = None) -> int:
    """Give ``model`` the recorded shapes and attributes (weights uninitialised); returns modules replaced."""
    replaced = 0
    for name, spec in data["linears"].items():
        cur = model.get_submodule(name)
        o, i = weight_view(cur).shape
        same = (o, i) == (spec["out"], spec["in"]) and (getattr(cur, "bias", None) is not None) == spec["bias"] \
            and ("Conv1D" if _is_conv1d(cur) else "Linear") == spec["type"]
        if same:
            continue
        if spec["type"] == "Linear" and _is_conv1d(cur):
            new = plain_linear(spec["in"], spec["out"], spec["bias"], dtype=dtype or cur.weight.dtype)
        else:
            new = new_linear_like(cur, spec["out"], spec["in"], spec["bias"])
            if dtype is not None:
                new.to(dtype)
        set_module(model, name, new)
        replaced += 1
    for name, attrs in data.get("attributes", {}).items():
        set_attributes(model.get_submodule(name), attrs)
    return replaced


def load_structured_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`prunekit.export.structured.save_structured` (prunekit format)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    data = read_manifest(path)
    sums = checksum.verify_manifest(data, path / MANIFEST)  # before anything is built from it
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"structured folder {str(path)!r} has a manifest but no {WEIGHTS}; the save was incomplete")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    n = rebuild(model, data, dtype)
    state = checksum.read_verified(weights, sums)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = model.state_dict()
    ptrs = {params[k].data_ptr() for k in params if k in state}
    real_missing = [k for k in missing if params[k].data_ptr() not in ptrs]  # tied weights share storage
    if unexpected or real_missing:
        raise ConfigError(f"structured folder {str(path)!r} does not match its manifest: missing {real_missing[:5]}, "
                          f"unexpected {list(unexpected)[:5]}")
    log.info("rebuilt %d smaller linears from %s", n, path)
    return model.eval()
