"""Whether a stock config can say a structurally pruned model: then it is saved as a plain Hugging Face folder.

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
prunekit's format (:mod:`prunekit.formats.structured`, which also writes both), which
``prunekit.load_model`` rebuilds as real smaller linears.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..models.structure import block_parts

log = logging.getLogger(__name__)

_FFN_WIDTH = ("intermediate_size", "ffn_dim", "n_inner")
_BIAS_FLAGS = ("attention_bias", "mlp_bias")


def tensor_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def meta_shapes(config) -> dict[str, tuple] | None:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an invalid config (e.g. heads that do not divide the hidden size) cannot be plain
        log.info("config cannot be built: %s", e)
        return None
    return tensor_shapes(m)


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
    ours = tensor_shapes(model)
    ok, extra, lacking = _compare(ours, meta_shapes(cfg))
    if not ok and lacking and all(k.endswith(".bias") for k in lacking):  # bias compensation added biases
        for flag in _BIAS_FLAGS:
            if hasattr(text, flag):
                setattr(text, flag, True)
        ok, extra, lacking = _compare(ours, meta_shapes(cfg))
    if not ok:
        return None, [], f"this architecture's config cannot express these shapes (e.g. {lacking[0] if lacking else '?'})"
    refusal = config_refusal(cfg)
    if refusal is not None:
        return None, [], f"transformers refuses the smaller config: {refusal}"
    return cfg, extra, ""


def is_restructured(model: nn.Module) -> bool:
    """True if the model's shapes differ from what its own config builds (it was structurally pruned)."""
    ok, extra, _ = _compare(tensor_shapes(model), meta_shapes(model.config))
    return not ok or bool(extra)
