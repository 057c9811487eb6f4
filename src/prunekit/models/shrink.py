"""Make a model physically smaller: fewer heads, FFN channels or decoder blocks.

Every function here builds *new*, smaller ``nn.Linear`` (or GPT-2 ``Conv1D``) modules holding the
kept rows/columns — no masks, no padding — and keeps the attributes the modules' forward reads
consistent (``num_key_value_groups``, ``num_heads``, GPT-2's ``split_size``, ``layer_idx``), and
the config's per-layer facts (``num_hidden_layers``, ``layer_types`` and any other per-layer list)
when blocks go. The model's config is *not* changed for widths here; :mod:`prunekit.formats.structured`
decides whether a stock config can express the result.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .blocks import find_blocks, set_module
from .linear import is_conv1d, weight_view
from .structure import AttentionParts, FFNParts

log = logging.getLogger(__name__)

#: attention attributes a forward may read, recomputed after heads are removed
HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups", "split_size")


def new_linear_like(module: nn.Module, out_f: int, in_f: int, bias: bool) -> nn.Module:
    """An empty module of ``module``'s class (Linear or Conv1D), dtype and device with the given shape."""
    w = module.weight
    if is_conv1d(module) and out_f and in_f:  # a zero-width Conv1D cannot run (it reshapes to [-1, 0])
        new = type(module)(out_f, in_f)
        new.to(device=w.device, dtype=w.dtype)
        if not bias:
            new.bias = None
        return new
    return plain_linear(in_f, out_f, bias, w.device, w.dtype)


def plain_linear(in_f: int, out_f: int, bias: bool, device=None, dtype=None) -> nn.Linear:
    """``nn.Linear`` (width 0 allowed: a dropped FFN has nothing to initialise, so no warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)


def sliced_linear(module: nn.Module, rows: Tensor | None = None, cols: Tensor | None = None,
                  bias: Tensor | None = None) -> nn.Module:
    """A new module holding ``W[rows][:, cols]`` (``None``: all) and the kept bias entries.

    ``bias`` replaces the bias (after row selection); a module without one gets it.
    """
    w = weight_view(module)
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    if b is not None and rows is not None:
        b = b.index_select(0, rows.to(b.device))
    if bias is not None:
        b = bias
    new = new_linear_like(module, w.shape[0], w.shape[1], b is not None)
    with torch.no_grad():
        if is_conv1d(new):
            new.weight.copy_(w.t())
        else:
            new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b.to(new.bias.dtype))
    new.train(module.training)
    return new


def _complement(n: int, removed: Iterable[int]) -> Tensor:
    gone = set(int(i) for i in removed)
    return torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)


def remove_heads(model: nn.Module, attn: AttentionParts, heads: Iterable[int], groups: Iterable[int] = ()) -> dict:
    """Remove query heads ``heads`` and key/value groups ``groups`` (with every query head reading them).

    The kept query heads must leave every kept group the same number of heads, so the attention
    stays valid grouped-query attention. Returns the attention attributes set.

    Raises:
        ConfigError: the result would be uneven or empty.
    """
    groups = sorted(set(int(g) for g in groups))
    gs = attn.group_size
    gone = set(int(h) for h in heads) | {g * gs + j for g in groups for j in range(gs)}
    keep_heads = [h for h in range(attn.heads) if h not in gone]
    keep_groups = [g for g in range(attn.kv_heads) if g not in groups]
    per_group = {g: sum(1 for h in keep_heads if h // gs == g) for g in keep_groups}
    if not keep_heads or len(set(per_group.values())) != 1 or 0 in per_group.values():
        raise ConfigError(f"{attn.module}: keeping query heads {keep_heads} of key/value groups {keep_groups} "
                          "would leave the groups uneven or empty (invalid grouped-query attention)")
    if not gone:
        return {}
    attn_mod = model.get_submodule(attn.module)
    if attn.layout == "separate":
        q_rows = torch.cat([attn.q_rows(h) for h in keep_heads])
        kv_rows = torch.cat([attn.k_rows(g) for g in keep_groups])
        set_module(model, attn.q, sliced_linear(model.get_submodule(attn.q), rows=q_rows))
        set_module(model, attn.k, sliced_linear(model.get_submodule(attn.k), rows=kv_rows))
        set_module(model, attn.v, sliced_linear(model.get_submodule(attn.v), rows=kv_rows))
    else:  # fused layouts are multi-head (one query head per group)
        if attn.layout == "fused":
            rows = torch.cat([attn.q_rows(h) for h in keep_heads] + [attn.k_rows(h) for h in keep_heads]
                             + [attn.v_rows(h) for h in keep_heads])
        else:  # q, k, v interleaved per head
            rows = torch.cat([r for h in keep_heads for r in (attn.q_rows(h), attn.k_rows(h), attn.v_rows(h))])
        set_module(model, attn.q, sliced_linear(model.get_submodule(attn.q), rows=rows))
    o_cols = torch.cat([attn.o_cols(h) for h in keep_heads])
    set_module(model, attn.o, sliced_linear(model.get_submodule(attn.o), cols=o_cols))
    n_heads, n_kv = len(keep_heads), len(keep_groups)
    values = {"num_heads": n_heads, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
              "num_key_value_groups": n_heads // n_kv, "split_size": n_heads * attn.head_dim}
    return set_attributes(attn_mod, values)


def set_attributes(module: nn.Module, values: dict) -> dict:
    """Set those of ``values`` that ``module`` already has (its forward may read them); returns what was set."""
    done = {}
    for key, value in values.items():
        if isinstance(getattr(module, key, None), int) and not isinstance(getattr(module, key), bool):
            setattr(module, key, value)
            done[key] = value
    return done


def remove_channels(model: nn.Module, ffn: FFNParts, channels: Iterable[int], out_bias: Tensor | None = None) -> dict:
    """Remove FFN channels (rows of every input projection, columns of the output projection).

    ``out_bias``: the output projection's new bias (bias compensation); all channels may go
    (an FFN of width 0 adds only its output bias, or nothing). Returns the attributes set.
    """
    keep = _complement(ffn.width, channels)
    for name in ffn.inputs:
        set_module(model, name, sliced_linear(model.get_submodule(name), rows=keep))
    set_module(model, ffn.output, sliced_linear(model.get_submodule(ffn.output), cols=keep, bias=out_bias))
    return set_attributes(model.get_submodule(ffn.module), {"intermediate_size": len(keep)})


def drop_blocks(model: nn.Module, blocks_to_drop: Iterable[int]) -> list[int]:
    """Delete whole decoder blocks; renumber ``layer_idx`` and keep the config's per-layer facts consistent.

    Every list in the (text) config as long as the number of layers (``layer_types`` and the like)
    is filtered to the kept blocks. Returns the kept original indices.
    """
    path, blocks = find_blocks(model)
    n = len(blocks)
    gone = set(int(i) for i in blocks_to_drop)
    keep = [i for i in range(n) if i not in gone]
    if not keep:
        raise ConfigError(f"removing blocks {sorted(gone)} would leave {type(model).__name__} without a decoder block")
    if not gone:
        return keep
    new = nn.ModuleList([blocks[i] for i in keep])
    set_module(model, path, new)
    for new_idx, block in enumerate(new):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new_idx
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key, value in list(vars(cfg).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and key != "architectures":
            setattr(cfg, key, type(value)(value[i] for i in keep))
            log.info("config.%s filtered to the %d kept blocks", key, len(keep))
    cfg.num_hidden_layers = len(keep)
    return keep
