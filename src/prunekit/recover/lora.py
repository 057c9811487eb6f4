"""LoRA through ``peft`` (Hu et al. 2021), merged back *through the mask*.

A LoRA adapter learns ``W' = W + s * B A`` (``s = alpha / r``). Merged plainly, ``B A`` is dense and
fills every pruned position: a 50 % model becomes a dense one. prunekit merges
``W <- W + s * (B A) * M`` (PROTOCOLS.md), so the merged model keeps exactly the positions the
pruning zeroed. What the mask throws away is measured two ways: the share of the adapter
update's energy ``||s (B A) * (1 - M)||^2 / ||s B A||^2`` that lands on pruned positions, and —
when the caller passes an evaluation — the quality with the adapters still active, which equals
an unmasked merge exactly.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..errors import ConfigError
from ..models import set_module
from .config import RecoverConfig
from .masks import MaskSet
from .optim import _quiet_bitsandbytes

log = logging.getLogger(__name__)

ADAPTER = "default"


def _peft():
    try:
        with _quiet_bitsandbytes():
            import peft
            from peft.tuners.lora import LoraLayer
    except ImportError as e:
        raise ConfigError(f"trainable='lora' needs the peft package ({e}); install it with "
                          "pip install 'prunekit[recover]' or pip install peft") from None
    return peft, LoraLayer


def add_lora(model: nn.Module, names: list[str], cfg: RecoverConfig) -> list[tuple[str, nn.Parameter]]:
    """Inject LoRA adapters into the linears ``names`` (in place); freeze everything else.

    The adapters' initialisation draws from torch's global generator: seed it before calling.
    Returns the trainable ``(name, parameter)`` pairs in a fixed order.
    """
    peft, _ = _peft()
    pattern = "(" + "|".join(re.escape(n) for n in names) + ")"
    conf = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                           target_modules=pattern, bias="none")
    peft.inject_adapter_in_model(conf, model, adapter_name=ADAPTER)
    named = []
    for n, p in model.named_parameters():
        train = ".lora_A." in n or ".lora_B." in n
        p.requires_grad_(train)
        if train:
            named.append((n, p))
    log.info("LoRA rank %d (alpha %g) on %d linears: %d trainable parameters", cfg.lora_rank, cfg.lora_alpha,
             len(names), sum(p.numel() for _, p in named))
    return named


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    _, lora_layer = _peft()
    return {n: m for n, m in model.named_modules() if isinstance(m, lora_layer)}


@torch.no_grad()
def merge_lora(model: nn.Module, masks: MaskSet, masked: bool = True) -> dict:
    """Merge every adapter into its base weight and remove it (in place).

    Args:
        model: a model with injected LoRA layers.
        masks: the pruned positions; with ``masked=True`` the update is multiplied by the mask.
        masked: ``False`` merges plainly (densifies pruned layers: for comparison only).

    Returns:
        ``{"layers", "dropped_energy"}``: how many adapters were merged and the share of the
        update's squared norm that fell on pruned positions (and was dropped when masked).
    """
    layers = lora_layers(model)
    dropped = total = 0.0
    for name, layer in layers.items():
        base = layer.get_base_layer()
        delta = layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
        pruned = masks.for_param(base.weight)
        total += float(delta.double().square().sum())
        if pruned is not None:
            dropped += float(delta[pruned].double().square().sum())
            if masked:
                delta = delta.masked_fill(pruned, 0)
        base.weight.add_(delta)
        set_module(model, name, base)
    share = dropped / total if total else 0.0
    log.info("merged %d LoRA adapters (%s); %.4f of the update's energy fell on pruned positions", len(layers),
             "through the mask" if masked else "UNMASKED", share)
    return {"layers": len(layers), "masked": masked, "dropped_energy": share}
