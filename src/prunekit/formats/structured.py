"""Structurally pruned models on disk: a plain folder when a stock config can say them
(:mod:`prunekit.formats.structured_plain`), else prunekit's structured folder, described here.

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

import copy
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..models.blocks import decoder_linears, set_module
from ..models.linear import is_conv1d, weight_view
from ..models.runtime import clear_quantizer
from ..models.shrink import HEAD_ATTRS, new_linear_like, plain_linear, set_attributes
from ..models.structure import block_parts
from . import checksum
from .atomic import atomic_folder, is_disk_full
from .base import FORMATS, Format
from .dense import LOADER
from .sizes import REPORT_FILE, model_bytes
from .state import dedup_state
from .structured_plain import config_refusal, meta_shapes, plain_config_why

log = logging.getLogger(__name__)

MANIFEST = "prunekit_structured.json"
WEIGHTS = "prunekit_structured.safetensors"
FORMAT = "prunekit-structured"

PLAIN = f"plain Hugging Face folder with a smaller config: {LOADER} loads it"
PRUNEKIT = ("prunekit structured format: reload with prunekit.load_model, which rebuilds the smaller linears; plain "
            "transformers cannot load it")


def linear_specs(model: nn.Module) -> dict[str, dict]:
    """Class, ``[out, in]`` shape and bias of every decoder linear."""
    out = {}
    for name, mod in decoder_linears(model).items():
        o, i = weight_view(mod).shape
        out[name] = {"type": "Conv1D" if is_conv1d(mod) else "Linear", "out": int(o), "in": int(i),
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
            and ("Conv1D" if is_conv1d(cur) else "Linear") == spec["type"]
        if same:
            continue
        if spec["type"] == "Linear" and is_conv1d(cur):
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
    """Rebuild a model saved by :func:`save_structured` (prunekit format)."""
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


def save_structured(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                    overwrite: bool = False) -> tuple[Path, str]:
    """Save atomically as a plain folder if a stock config can express the model, else in prunekit's format.

    Returns the folder and a sentence saying which loader reads it.
    """
    clear_quantizer(model)
    cfg, zeros, why = plain_config_why(model)

    def write_common(tmp: Path) -> None:
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))

    if cfg is not None:
        def write(tmp: Path) -> None:
            state = model.state_dict()
            shapes = meta_shapes(cfg) if zeros else {}
            for k in zeros:  # biases the config's switch adds to other projections: exactly zero
                state[k] = torch.zeros(shapes[k], dtype=model.dtype)
            original = model.config
            model.config = cfg
            try:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            finally:
                model.config = original
            write_common(tmp)

        try:
            out = atomic_folder(out_dir, write, overwrite, needed_bytes=model_bytes(model))
        except Exception as e:  # noqa: BLE001 - a refusal must not lose a finished prune: save prunekit's format
            if isinstance(e, (OSError, ConfigError)) or is_disk_full(e):
                raise
            why = f"transformers refused the plain folder at save time: {' '.join(str(e).split())[:200]}"
            log.warning("%s; saving prunekit's structured format instead", why)
        else:
            log.info("saved a plain folder (%d zero biases added) to %s", len(zeros), out)
            return out, PLAIN

    from safetensors.torch import save_file

    def write_prunekit(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        state = dedup_state(model)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(checksum.seal(manifest(model), checksum.checksums(state)), indent=2))
        write_common(tmp)

    out = atomic_folder(out_dir, write_prunekit, overwrite, needed_bytes=model_bytes(model))
    log.info("saved in prunekit's structured format to %s (%s)", out, why)
    return out, f"{PRUNEKIT} ({why})"


def heads_refusal(config, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """Why transformers would refuse ``config`` with these head counts in every block (the model is then
    saved in prunekit's structured format), or ``None`` when a plain folder can say them."""
    cfg = copy.deepcopy(config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.num_attention_heads, text.head_dim = heads, head_dim
    if hasattr(text, "num_key_value_heads"):
        text.num_key_value_heads = kv_heads
    return config_refusal(cfg)


def save_plan(model: nn.Module, params: int) -> dict:
    """How the model will be saved, and the parameters the saved folder holds (exact; ``params``: the model's).

    A plain folder may hold a few more: when bias compensation added biases to the output
    projections, the config's bias switch also gives q/k/v (or gate/up) biases, saved as zeros.
    """
    cfg, zeros, why = plain_config_why(model)
    if cfg is None:
        return {"format": FORMAT, "loader": "prunekit.load_model", "why": why}
    extra = 0
    if zeros:
        meta = meta_shapes(cfg)
        extra = sum(int(torch.Size(meta[k]).numel()) for k in zeros)
    return {"format": "plain", "loader": LOADER, "zero_biases_added": len(zeros), "zero_bias_params": extra,
            "params_saved": params + extra}


class StructuredFormat(Format):
    """prunekit's structured folder (recognised by its manifest); saving writes a plain folder when it can."""

    name = "structured"
    order = 30

    def detect(self, path: str | os.PathLike) -> bool:
        return is_structured_folder(path)

    def save(self, model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
             overwrite: bool = False) -> tuple[Path, str]:
        return save_structured(model, tokenizer, out_dir, report, overwrite)

    def load(self, path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> nn.Module:
        return load_structured_model(path, dtype, trust_remote_code)


STRUCTURED = FORMATS.add("structured", StructuredFormat(),
                         help="structurally pruned: plain folder when a stock config says it, else prunekit's (per-block widths)")
