"""Saving structurally pruned models: a plain Hugging Face folder whenever a stock config can say it.

:func:`plain_config` writes the smaller widths into a copy of the config — the FFN width
(``intermediate_size`` / ``ffn_dim`` / ``n_inner``), ``num_attention_heads``,
``num_key_value_heads`` and an explicit ``head_dim``, and the bias switches
(``attention_bias`` / ``mlp_bias``) when bias compensation added a bias — and then *checks* it:
the architecture is built from it on the meta device and every tensor name and shape must equal
the model's (biases the switch adds elsewhere are saved as zeros, which is exact). Block removal
is already in the config (``num_hidden_layers``, ``layer_types``). If the check passes the folder
is plain safetensors that ``AutoModelForCausalLM.from_pretrained`` loads with no prunekit
installed; otherwise (per-block widths, shapes the architecture's config cannot express, or a
config transformers would refuse — Llama wants ``hidden_size`` divisible by the head count even
with an explicit ``head_dim``, so 8 heads pruned to 6 on a 64-wide model cannot be plain) it is
prunekit's format (:mod:`prunekit.models.structured`), which ``prunekit.load_model`` rebuilds as
real smaller linears, and the returned sentence says why. Should transformers still refuse the
plain folder while it is written, the prunekit format is written instead: a finished prune is
never lost to a save-time refusal.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..formats import checksum
from ..models import clear_quantizer
from ..models.structured import MANIFEST, WEIGHTS, manifest
from ..models.structure import block_parts
from ..errors import ConfigError
from .atomic import is_disk_full
from .save import REPORT_FILE, atomic_folder, model_bytes

log = logging.getLogger(__name__)

_FFN_WIDTH = ("intermediate_size", "ffn_dim", "n_inner")
_BIAS_FLAGS = ("attention_bias", "mlp_bias")

PLAIN = "plain Hugging Face folder with a smaller config: transformers.AutoModelForCausalLM.from_pretrained loads it"
PRUNEKIT = ("prunekit structured format: reload with prunekit.load_model, which rebuilds the smaller linears; plain "
            "transformers cannot load it")


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _meta_shapes(config) -> dict[str, tuple] | None:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an invalid config (e.g. heads that do not divide the hidden size) cannot be plain
        log.info("config cannot be built: %s", e)
        return None
    return _shapes(m)


def _compare(ours: dict, theirs: dict | None) -> tuple[bool, list[str], list[str]]:
    """``(match, tensors only the config has, tensors only the model has)``; a match allows extra biases."""
    if theirs is None:
        return False, [], list(ours)
    extra = [k for k in theirs if k not in ours]
    lacking = [k for k in ours if k not in theirs]
    bad = [k for k in ours if k in theirs and theirs[k] != ours[k]]
    ok = not lacking and not bad and all(k.endswith(".bias") for k in extra)
    return ok, extra, lacking + bad


def config_refusal(cfg) -> str | None:
    """Why stock transformers would refuse ``cfg`` (its checks at save and at load), or ``None``.

    ``from_config`` builds a model from a config that ``save_pretrained`` then rejects (e.g. Llama:
    ``hidden_size`` must be a multiple of ``num_attention_heads`` even with an explicit ``head_dim``),
    so the config is validated and rebuilt from its own JSON, as a save and a reload would.
    """
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
        again = type(cfg).from_dict(cfg.to_dict())
        if hasattr(again, "validate"):
            again.validate()
    except Exception as e:  # noqa: BLE001 - any refusal means: not a plain folder
        text = " ".join(str(e).split())
        return text.split("ValueError: ")[-1][:200] or type(e).__name__
    return None


def plain_config(model: nn.Module):
    """``(config, zero_biases)`` that rebuild exactly this model with plain transformers, or ``(None, [])``."""
    cfg, zeros, _ = plain_config_why(model)
    return cfg, zeros


def plain_config_why(model: nn.Module):
    """:func:`plain_config` and, when it is ``None``, one phrase saying why a stock config cannot say it."""
    parts = block_parts(model)
    cfg = copy.deepcopy(model.config)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    ffn = {bp.ffn.width for bp in parts if bp.ffn is not None}
    heads = {(bp.attn.heads, bp.attn.kv_heads, bp.attn.head_dim) for bp in parts if bp.attn is not None}
    if len(ffn) > 1 or len(heads) > 1:
        return None, [], "the blocks have different widths, which one config field cannot say"
    if ffn:
        width = ffn.pop()
        for attr in _FFN_WIDTH:
            if attr in vars(text) or hasattr(type(text), attr):
                setattr(text, attr, width)
                break
    if heads:
        h, kv, d = heads.pop()
        if (h, kv, d) != (text.num_attention_heads, getattr(text, "num_key_value_heads", h),
                          getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads):
            text.num_attention_heads = h
            if hasattr(text, "num_key_value_heads"):
                text.num_key_value_heads = kv
            text.head_dim = d
    ours = _shapes(model)
    ok, extra, lacking = _compare(ours, _meta_shapes(cfg))
    if not ok and lacking and all(k.endswith(".bias") for k in lacking):  # bias compensation added biases
        for flag in _BIAS_FLAGS:
            if hasattr(text, flag):
                setattr(text, flag, True)
        ok, extra, lacking = _compare(ours, _meta_shapes(cfg))
    if not ok:
        return None, [], f"this architecture's config cannot express these shapes (e.g. {lacking[0] if lacking else '?'})"
    refusal = config_refusal(cfg)
    if refusal is not None:
        return None, [], f"transformers refuses the smaller config: {refusal}"
    return cfg, extra, ""


def is_restructured(model: nn.Module) -> bool:
    """True if the model's shapes differ from what its own config builds (it was structurally pruned)."""
    ok, extra, _ = _compare(_shapes(model), _meta_shapes(model.config))
    return not ok or bool(extra)


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
            shapes = _meta_shapes(cfg) if zeros else {}
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

    from .lowrank import _unique_state

    def write_prunekit(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        state = _unique_state(model)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(checksum.seal(manifest(model), checksum.checksums(state)), indent=2))
        write_common(tmp)

    out = atomic_folder(out_dir, write_prunekit, overwrite, needed_bytes=model_bytes(model))
    log.info("saved in prunekit's structured format to %s (%s)", out, why)
    return out, f"{PRUNEKIT} ({why})"
