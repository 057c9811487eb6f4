"""Exact accounting of a structurally pruned model: parameters, per-block widths, uniformity."""

from __future__ import annotations

from torch import nn

from ..models import decoder_linears, weight_view
from ..models.structure import block_parts


def param_count(model: nn.Module) -> int:
    """Every parameter once (tied embeddings counted once), biases included."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def widths(model: nn.Module) -> list[dict]:
    """Per block: query heads, key/value heads, FFN width (as the weights now are)."""
    out = []
    for bp in block_parts(model):
        out.append({"heads": bp.attn.heads if bp.attn else None, "kv_heads": bp.attn.kv_heads if bp.attn else None,
                    "ffn": bp.ffn.width if bp.ffn else None})
    return out


def structure_summary(model: nn.Module, dense_params: int, plans: dict | None) -> dict:
    """What the report says about the smaller model (exact counts)."""
    w = widths(model)
    linear = sum(weight_view(m).numel() for m in decoder_linears(model).values())
    params = param_count(model)
    out = {
        "params_dense": dense_params,
        "params": params,
        "params_removed": dense_params - params,
        "decoder_linear_weights": linear,
        "blocks": len(w),
        "uniform_widths": all(x == w[0] for x in w),
        "widths": w,
    }
    if plans is not None:
        out["plans"] = plans
    return out
