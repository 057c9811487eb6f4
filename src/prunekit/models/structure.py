"""What a decoder block is made of, for structured pruning: its attention heads and FFN channels.

Structured pruning removes *units* that span several linears: an FFN channel ``k`` is row ``k``
of every FFN input projection (gate/up, fc1, c_fc …) and column ``k`` of the output projection
(down, fc2, c_proj …); a query head is its ``head_dim`` rows of q and columns of the attention
output projection; a key/value group is its rows of k and v (and every query head that reads it).

This module is the only place that knows how the supported architectures lay those out:

* separate q/k/v/o projections (Llama, Qwen2, Mistral, Gemma-2/3; OPT's ``out_proj``);
* GPT-2's fused ``c_attn`` (a transposed Conv1D whose outputs are ``[q | k | v]``, each
  ``hidden`` wide, multi-head attention only);
* GPT-NeoX's fused ``query_key_value`` whose outputs are interleaved per head
  (``[q_0 k_0 v_0 | q_1 k_1 v_1 | …]``).

Head counts are read from the weight shapes, never from the config, so a model whose blocks were
already pruned to different widths is described correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .blocks import find_blocks
from .linear import in_features, out_features, weight_view

#: (q, k, v, o) child names of an attention module with separate projections
_SEPARATE = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"))
#: (fused qkv, o, layout)
_FUSED = (("c_attn", "c_proj", "fused"), ("query_key_value", "dense", "interleaved"))
#: (input projections, output projection) of an FFN
_FFN = ((("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj"), (("dense_h_to_4h",), "dense_4h_to_h"),
        (("fc1",), "fc2"), (("w1", "w3"), "w2"))
_ATTN_NAMES = ("self_attn", "attn", "attention")
_FFN_NAMES = ("mlp", "feed_forward", "ffn")
#: norms applied to the FFN's output before the residual add (Gemma-2/3)
_POST_FFN_NORMS = ("post_feedforward_layernorm",)


@dataclass
class AttentionParts:
    """The attention of one block: where its projections are and how heads map to rows.

    ``q``/``k``/``v`` are qualified names of separate projections, or all three the same fused
    linear (``layout`` ``"fused"`` or ``"interleaved"``). ``heads`` query heads share
    ``kv_heads`` key/value heads (grouped-query attention when ``kv_heads < heads``).
    """

    module: str
    layout: str  # "separate" | "fused" | "interleaved"
    q: str
    k: str
    v: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.q, self.k, self.v, self.o)))

    def q_rows(self, head: int) -> Tensor:
        """Output rows of the q (or fused) projection that belong to query head ``head``."""
        return self._rows(head, 0)

    def k_rows(self, group: int) -> Tensor:
        return self._rows(group, 1)

    def v_rows(self, group: int) -> Tensor:
        return self._rows(group, 2)

    def _rows(self, h: int, which: int) -> Tensor:
        d = self.head_dim
        if self.layout == "separate":
            start = h * d
        elif self.layout == "fused":
            start = which * self.heads * d + h * d
        else:  # interleaved: per head [q k v]
            start = h * 3 * d + which * d
        return torch.arange(start, start + d)

    def o_cols(self, head: int) -> Tensor:
        """Input columns of the output projection fed by query head ``head``."""
        return torch.arange(head * self.head_dim, (head + 1) * self.head_dim)


@dataclass
class FFNParts:
    """The FFN of one block: input projections (one row per channel), output projection (one column)."""

    module: str  # the FFN module, or the block itself when fc1/fc2 sit on the block (OPT)
    inputs: tuple[str, ...]
    output: str
    width: int
    #: the module whose output the block adds to its residual stream
    contribution: str

    @property
    def linears(self) -> tuple[str, ...]:
        return (*self.inputs, self.output)


@dataclass
class BlockParts:
    """One decoder block: its qualified name and its attention/FFN (``None`` when not recognised)."""

    index: int
    prefix: str
    attn: AttentionParts | None
    ffn: FFNParts | None


def _child(module: nn.Module, names) -> tuple[str, nn.Module] | None:
    for n in names:
        m = getattr(module, n, None)
        if isinstance(m, nn.Module):
            return n, m
    return None


def _attention(block: nn.Module, prefix: str) -> AttentionParts | None:
    found = _child(block, _ATTN_NAMES)
    if found is None:
        return None
    name, attn = found
    if getattr(attn, "is_cross_attention", False):
        return None
    base = f"{prefix}.{name}"
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        return None
    for q, k, v, o in _SEPARATE:
        mods = [getattr(attn, n, None) for n in (q, k, v, o)]
        if all(m is not None and hasattr(m, "weight") for m in mods):
            heads, kv = out_features(mods[0]) // head_dim, out_features(mods[1]) // head_dim
            if heads < 1 or kv < 1 or heads % kv or out_features(mods[2]) != kv * head_dim:
                return None
            return AttentionParts(base, "separate", f"{base}.{q}", f"{base}.{k}", f"{base}.{v}", f"{base}.{o}",
                                  heads, kv, head_dim)
    for qkv, o, layout in _FUSED:
        fused, out = getattr(attn, qkv, None), getattr(attn, o, None)
        if fused is not None and out is not None and hasattr(fused, "weight"):
            rows = out_features(fused)
            if rows % (3 * head_dim):
                return None
            heads = rows // (3 * head_dim)
            return AttentionParts(base, layout, f"{base}.{qkv}", f"{base}.{qkv}", f"{base}.{qkv}", f"{base}.{o}",
                                  heads, heads, head_dim)
    return None


def _ffn(block: nn.Module, prefix: str) -> FFNParts | None:
    found = _child(block, _FFN_NAMES)
    holders = [(f"{prefix}.{found[0]}", found[1])] if found else []
    holders.append((prefix, block))  # OPT keeps fc1/fc2 on the block itself
    for base, holder in holders:
        for inputs, output in _FFN:
            mods = [getattr(holder, n, None) for n in (*inputs, output)]
            if all(m is not None and hasattr(m, "weight") for m in mods):
                width = out_features(mods[0])
                if any(out_features(m) != width for m in mods[:-1]) or in_features(mods[-1]) != width:
                    return None
                norm = _child(block, _POST_FFN_NORMS)
                contribution = f"{prefix}.{norm[0]}" if norm else f"{base}.{output}"
                return FFNParts(base, tuple(f"{base}.{n}" for n in inputs), f"{base}.{output}", width, contribution)
    return None


def block_parts(model: nn.Module) -> list[BlockParts]:
    """Every decoder block's attention and FFN layout (``None`` parts where not recognised)."""
    path, blocks = find_blocks(model)
    return [BlockParts(i, f"{path}.{i}", _attention(b, f"{path}.{i}"), _ffn(b, f"{path}.{i}"))
            for i, b in enumerate(blocks)]


def require_parts(model: nn.Module, kind: str, blocks: list[BlockParts] | None = None) -> list[BlockParts]:
    """:func:`block_parts`, or a one-line :class:`ConfigError` if ``kind`` (``"attn"``/``"ffn"``) is unknown.

    Raises:
        ConfigError: naming the architecture and why the pattern cannot apply.
    """
    blocks = blocks if blocks is not None else block_parts(model)
    missing = [b.index for b in blocks if getattr(b, kind) is None]
    if missing:
        what = {"attn": "attention whose heads prunekit can remove (it knows separate q/k/v/o projections, "
                        "GPT-2's c_attn and GPT-NeoX's query_key_value, self-attention only)",
                "ffn": "FFN whose channels prunekit can remove (it knows gate/up/down, fc1/fc2, c_fc/c_proj and "
                       "dense_h_to_4h/dense_4h_to_h; fused gate_up projections are not supported)"}[kind]
        raise ConfigError(f"{type(model).__name__}: block {missing[0]} has no {what}; use --pattern blocks, or an "
                          "unstructured pattern")
    return blocks


def module_lookup(model: nn.Module) -> Callable[[str], nn.Module]:
    """``name -> module`` for qualified names (re-read every call, so replaced modules are seen)."""
    return model.get_submodule


def head_weights(model: nn.Module, attn: AttentionParts) -> dict[str, Tensor]:
    """float32 ``[out, in]`` copies of q, k, v (rows ordered head by head) and o, whatever the layout."""
    get = module_lookup(model)
    if attn.layout == "separate":
        q, k, v = (weight_view(get(n)).float() for n in (attn.q, attn.k, attn.v))
    else:
        w = weight_view(get(attn.q)).float()
        q = w[torch.cat([attn.q_rows(h) for h in range(attn.heads)])]
        k = w[torch.cat([attn.k_rows(g) for g in range(attn.kv_heads)])]
        v = w[torch.cat([attn.v_rows(g) for g in range(attn.kv_heads)])]
    return {"q": q, "k": k, "v": v, "o": weight_view(get(attn.o)).float()}
