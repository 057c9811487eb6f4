"""Which llama.cpp architecture a (pruned) Hugging Face model becomes, its hyper-parameters and tensors.

llama.cpp builds every architecture from GGUF metadata and tensor names (``blk.N.attn_q.weight``
…, named here by the ``gguf`` package's own table). What each source family maps to:

* ``llama`` (SmolLM2, Llama): the ``llama`` architecture when every block has the same widths
  (any head count: ``attention.key_length`` carries the head size), else **``deci``** — llama.cpp's
  heterogeneous Llama (Nemotron-NAS), whose ``head_count``, ``head_count_kv`` and
  ``feed_forward_length`` may be per-layer arrays, a layer with head count 0 has no attention and
  one with FFN length 0 no FFN. Both use llama.cpp's "normal" RoPE, which rotates *adjacent*
  pairs of each head's dimensions while Hugging Face rotates the two *halves*; the rows of q and
  k are therefore reordered per head so that pair ``(j, j + d/2)`` becomes ``(2j, 2j + 1)`` —
  with each layer's *own* head count, which is the step a converter with one global head count
  gets wrong on a pruned model (the garbage of llama.cpp #9818).
* ``qwen2``: the ``qwen2`` architecture (half-split RoPE, no reordering) when the widths are uniform,
  the heads still span the hidden size (llama.cpp's qwen2 loader assumes ``n_head * head_dim ==
  n_embd``) and no bias was added where Qwen2 has none; otherwise ``deci``, with q/k reordered
  (weights *and* biases) like Llama's — the same computation in llama.cpp's other RoPE layout.
* ``gemma3_text``: ``gemma3`` with uniform widths and no biases (llama.cpp's gemma3 loader has one
  width for all layers, and no bias tensors); per-layer sliding-window flags are written as an
  array so that a model with blocks removed keeps its own local/global pattern. Gemma's RMSNorm
  multiplies by ``1 + w``; llama.cpp's by ``w``, so 1 is added to every norm weight.

:func:`describe` does every check that can fail before any tensor is converted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import gguf
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.blocks import find_blocks
from ..models.structure import block_parts

log = logging.getLogger(__name__)

SOURCES = ("llama", "qwen2", "gemma3_text")
_ARCH = {name: getattr(gguf.MODEL_ARCH, name.upper(), None) for name in ("llama", "deci", "qwen2", "gemma3")}


#: FFN width written for a block that kept its attention but lost its FFN (see :func:`_layer_shapes`)
ZERO_FFN = 32


@dataclass(frozen=True)
class LayerShape:
    """One block as llama.cpp sees it (``heads == 0``: no attention; ``ffn == 0``: no FFN).

    ``zero_ffn``: the source block has no FFN but keeps its attention; it is written as an FFN of
    :data:`ZERO_FFN` all-zero channels (exactly zero output, plus the source's output bias if any).
    """

    heads: int
    kv_heads: int
    ffn: int
    zero_ffn: bool = False


@dataclass
class Tensor_:
    """One tensor to write: source name, GGUF name, and how to turn the source into GGUF's values."""

    source: str | None  # None: all zeros of ``shape`` (a zero FFN's projections)
    name: str
    shape: tuple[int, ...]  # torch order ([out, in] for a weight)
    role: str  # "ffn_down" | "attn_output" | "embd" | "weight" | "vector"
    permute_heads: int = 0  # reorder rows per head for llama.cpp's adjacent-pair RoPE (0: no)
    add_one: bool = False  # Gemma norms: w -> 1 + w


@dataclass
class Layout:
    """What the GGUF will hold; built by :func:`describe` before any conversion."""

    source: str
    arch: str
    layers: list[LayerShape]
    head_dim: int
    hidden: int
    vocab: int
    tensors: list[Tensor_] = field(default_factory=list)
    rope_freqs: Tensor | None = None

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) == 1

    @property
    def gguf_arch(self) -> gguf.MODEL_ARCH:
        if _ARCH[self.arch] is None:
            from importlib.metadata import version

            raise ConfigError(f"the installed gguf package ({version('gguf')}) does not know llama.cpp's "
                              f"{self.arch} architecture: pip install 'gguf>=0.19' (pip install -e '.[deploy]')")
        return _ARCH[self.arch]


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _rope(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in params:
        return params
    legacy = {"rope_theta": getattr(cfg, "rope_theta", None), **(getattr(cfg, "rope_scaling", None) or {})}
    return params or {k: v for k, v in legacy.items() if v is not None}


def _layer_shapes(model: nn.Module) -> tuple[list[LayerShape], int]:
    """Per-block heads / KV heads / FFN width from the weight shapes, and the head size."""
    shapes, head_dims = [], set()
    for bp in block_parts(model):
        block = model.get_submodule(bp.prefix)
        attn = bp.attn
        if attn is None:
            if not _removed(getattr(block, "self_attn", None)):
                raise ConfigError(f"block {bp.index} of {type(model).__name__}: its attention is not laid out as "
                                  "separate q/k/v/o projections; GGUF export supports Llama, Qwen2 and Gemma-3 blocks")
            heads = kv = 0
        else:
            if attn.layout != "separate":
                raise ConfigError(f"block {bp.index}: fused attention projections are not supported for GGUF export")
            heads, kv = attn.heads, attn.kv_heads
            head_dims.add(attn.head_dim)
        if bp.ffn is None or bp.ffn.inputs[0].rsplit(".", 1)[-1] != "gate_proj":
            raise ConfigError(f"block {bp.index} of {type(model).__name__}: GGUF export needs a gate/up/down FFN")
        width = bp.ffn.width
        # llama.cpp's deci graph ends a layer whose FFN length is 0 before adding its attention output to the
        # residual stream (measured: wrong logits, and a crash when it is the last layer), so a block that keeps
        # its attention gets a zero FFN instead; a block with neither is an exact no-op there
        zero = width == 0 and heads > 0
        shapes.append(LayerShape(heads, kv, ZERO_FFN if zero else width, zero))
    if len(head_dims) != 1:
        raise ConfigError(f"GGUF needs one head size for all layers, the model has {sorted(head_dims) or 'none'}")
    return shapes, head_dims.pop()


def _removed(attn: nn.Module | None) -> bool:
    """True for an attention sub-block that was taken out: no weights at all, or zero query heads."""
    if attn is None:
        return False
    q = getattr(attn, "q_proj", None)
    return (q is not None and q.weight.shape[0] == 0) or all(p.numel() == 0 for p in attn.parameters())


def _nonzero_bias(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    return [n for n, p in model.named_parameters() if n.endswith(".bias") and n.rsplit(".", 2)[-2] in suffixes
            and bool(p.detach().ne(0).any())]


def choose_arch(model: nn.Module, layers: list[LayerShape], head_dim: int) -> tuple[str, str]:
    """``(source model_type, llama.cpp architecture)``, or a one-line :class:`ConfigError`."""
    cfg = _text_config(model)
    src = getattr(cfg, "model_type", None)
    if src not in SOURCES:
        raise ConfigError(f"GGUF export supports model types {', '.join(SOURCES)}; this model is {src!r} "
                          f"({type(model).__name__})")
    uniform = len(set(layers)) == 1 and layers[0].heads > 0 and layers[0].ffn > 0
    if src == "gemma3_text":
        biased = _nonzero_bias(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        if not uniform or biased:
            why = "per-layer widths" if not uniform else f"a bias ({biased[0]})"
            raise ConfigError(f"this Gemma-3 model has {why}, which llama.cpp's gemma3 architecture cannot hold (one "
                              "width for all layers, no biases); prune Gemma-3 with uniform allocation and no bias "
                              "compensation (e.g. --method slimgpt) to export it")
        scalar = getattr(cfg, "query_pre_attn_scalar", None)
        expected = cfg.hidden_size / layers[0].heads if len(layers) == 62 else head_dim  # llama.cpp's fixed rule
        if scalar is not None and float(scalar) != float(expected):
            raise ConfigError(f"this Gemma-3 model scales attention by query_pre_attn_scalar={scalar}, but llama.cpp's "
                              f"gemma3 uses {expected:g} for a {len(layers)}-layer model (it reads no scale from the "
                              "GGUF): it would compute different attention")
        return src, "gemma3"
    if src == "qwen2":
        extra_bias = _nonzero_bias(model, ("o_proj", "gate_proj", "up_proj", "down_proj"))
        if getattr(cfg, "use_sliding_window", False):
            raise ConfigError("Qwen2 with use_sliding_window=true is not supported for GGUF export")
        if uniform and layers[0].heads * head_dim == cfg.hidden_size and not extra_bias:
            return src, "qwen2"
        return src, "deci"
    return src, "llama" if uniform else "deci"


def _rope_freqs(model: nn.Module, rope: dict) -> Tensor | None:
    """Llama-3-style RoPE scaling as llama.cpp's per-dimension divisors (default inv_freq / the model's)."""
    kind = (rope.get("rope_type") or "default").lower()
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"RoPE scaling {kind!r} is not supported for GGUF export (default and llama3 are)")
    rot = getattr(getattr(model, "model", model), "rotary_emb", None)
    inv = getattr(rot, "inv_freq", None)
    if inv is None:
        raise ConfigError("llama3 RoPE scaling: the model has no rotary_emb.inv_freq to read the factors from")
    dim = inv.numel() * 2
    base = float(rope["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (plain / inv.double()).float()


def describe(model: nn.Module) -> Layout:
    """The architecture, per-layer shapes and tensor list of ``model``'s GGUF (all checks, no conversion).

    Raises:
        ConfigError: an architecture, shape or feature llama.cpp cannot run, named in one line.
    """
    src = getattr(_text_config(model), "model_type", None)
    if src not in SOURCES:
        raise ConfigError(f"GGUF export supports model types {', '.join(SOURCES)}; this model is {src!r} "
                          f"({type(model).__name__})")
    layers, head_dim = _layer_shapes(model)
    src, arch = choose_arch(model, layers, head_dim)
    cfg = _text_config(model)
    if arch == "deci" and layers[0].heads == 0:
        raise ConfigError("block 0 has no attention: llama.cpp's deci loader reads the head size from layer 0, so "
                          "the first block must keep at least one head")
    rope = _rope(cfg)
    layout = Layout(src, arch, layers, head_dim, cfg.hidden_size, cfg.vocab_size)
    if arch in ("llama", "deci"):
        layout.rope_freqs = _rope_freqs(model, rope.get("full_attention", rope))
    elif (rope.get("full_attention", rope).get("rope_type") or "default") not in ("default",):
        raise ConfigError(f"RoPE scaling {rope.get('full_attention', rope).get('rope_type')!r} of this {src} model is "
                          "not supported for GGUF export")
    _ = layout.gguf_arch  # a too-old gguf package: one line, before any conversion
    layout.tensors = _tensors(model, layout)
    return layout


def _tensors(model: nn.Module, layout: Layout) -> list[Tensor_]:
    tmap = gguf.get_tensor_name_map(layout.gguf_arch, len(layout.layers))
    path, _ = find_blocks(model)
    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    reorder = layout.arch in ("llama", "deci")
    out = []
    for name, t in state.items():
        if name.endswith(".bias") and not bool(t.ne(0).any()) and "norm" not in name:
            continue  # exactly-zero biases (a config switch's) are left out: llama.cpp adds nothing instead
        if tied and name.endswith("lm_head.weight"):
            continue
        idx = _block_index(name, path)
        layer = layout.layers[idx] if idx is not None else None
        if layer is not None and _skipped(name, layer):
            continue
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ConfigError(f"tensor {name!r} has no GGUF name for llama.cpp's {layout.arch} architecture")
        role = _role(gname, t)
        shape = tuple(t.shape)
        source: str | None = name
        if layer is not None and layer.zero_ffn and ".mlp." in name and name.endswith(".weight"):
            source, shape = None, tuple(ZERO_FFN if d == 0 else d for d in shape)
        spec = Tensor_(source, gname, shape, role, add_one=layout.arch == "gemma3" and name.endswith("norm.weight"))
        if reorder and layer is not None:
            if ".q_proj." in name:
                spec.permute_heads = layer.heads
            elif ".k_proj." in name:
                spec.permute_heads = layer.kv_heads
        out.append(spec)
    return out


def _block_index(name: str, path: str) -> int | None:
    if not name.startswith(path + "."):
        return None
    return int(name[len(path) + 1:].split(".", 1)[0])


def _skipped(name: str, layer: LayerShape) -> bool:
    """Tensors of a removed sub-block: its empty projections and the norm in front of it."""
    if layer.heads == 0 and (".self_attn." in name or ".input_layernorm." in name):
        return True
    return layer.ffn == 0 and (".mlp." in name or ".post_attention_layernorm." in name)


def _role(gname: str, t: Tensor) -> str:
    if t.dim() == 1:
        return "vector"
    for key, role in (("ffn_down", "ffn_down"), ("attn_output", "attn_output"), ("token_embd", "embd")):
        if key in gname:
            return role
    return "weight"


def permute_rows(w: Tensor, heads: int) -> Tensor:
    """Rows of each head from half-split to adjacent-pair RoPE order: ``(j, j + d/2) -> (2j, 2j + 1)``."""
    if heads == 0:
        return w
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
