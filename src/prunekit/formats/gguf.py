"""GGUF export: any model prunekit writes, as a file llama.cpp runs (``prunekit export DIR --to gguf``).

The model is whatever :func:`prunekit.load_model` returns — dense, unstructured / N:M (zeros
stored), compressed folders (decoded), structurally pruned (uniform or per-layer widths; low-rank
factors are merged first). :func:`~prunekit.formats.gguf_arch.describe` picks llama.cpp's
architecture (``llama`` / ``qwen2`` / ``gemma3``, or ``deci`` for per-layer widths) and checks
everything; :func:`plan_types` picks each tensor's type and refuses, in one line and before any
conversion, what a quantization cannot hold; then the file is streamed one tensor at a time to a
temporary name and renamed into place, so a failure leaves nothing half-written.

Types (``--quant``): ``f32``, ``f16``, ``bf16`` and ``q8_0`` are written here (1-D tensors — norms
and biases — stay float32, as llama.cpp's converter keeps them). ``q4_k_m`` is llama.cpp's own
mixture (mostly Q4_K, some Q6_K) and is made by llama.cpp's ``llama-quantize`` from a float32
GGUF written first, so the file is what llama.cpp users get.

**Row lengths.** A GGUF weight's rows run along its *input* dimension (``ne0``): q8_0 packs 32
values per block, the K-quants 256. The hidden size is the model's own (SmolLM2's 576 is no
multiple of 256, so llama.cpp itself stores those rows as q5_0 in a q4_k_m file — the same for
the dense model); the attention output's rows are ``heads * head_dim``; ``ffn_down``'s rows are the
FFN width, which structured pruning chooses. A tensor whose row length is the hidden size or the
attention width falls back the way llama.cpp's quantizer does (Q4_K -> Q5_0, Q6_K -> Q8_0, q8_0 ->
F16 when even 32 does not divide) and the fallback is reported; an FFN width that the quantization
cannot hold is refused, naming the layer and the fix (``--width-multiple 256`` at pruning time), unless
``allow_fallback``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..models.lowrank import lowrank_modules, merge_lowrank
from .base import FORMATS, Format
from .dense import DENSE
from .gguf_arch import Layout, Tensor_, describe, permute_rows
from .gguf_read import materialized
from .gguf_vocab import vocab_from_tokenizer
from .sources import ModelSource
from .structured import MANIFEST as STRUCTURED_MANIFEST

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
#: the llama.cpp file type (``general.file_type``) of each choice
FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}
_WEIGHT_TYPE = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_k_m": Q.F32}
#: values per quantization block along a row
BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q4_k_m": 256}


@dataclass(frozen=True)
class GGUFOptions:
    """How to write the GGUF.

    Attributes:
        quant: ``f32`` | ``f16`` | ``bf16`` | ``q8_0`` | ``q4_k_m``.
        allow_fallback: quantize an FFN whose width the quantization cannot hold with llama.cpp's
            fallback type instead of refusing.
        tokenizer_pre: llama.cpp's pre-tokenizer name, when it cannot be read from the tokenizer.
        threads: threads for ``llama-quantize``.
    """

    quant: str = "f32"
    allow_fallback: bool = False
    tokenizer_pre: str | None = None
    threads: int = 2

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise ConfigError(f"--quant {self.quant!r} is not one of: {', '.join(QUANTS)}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")


@dataclass
class ExportReport:
    """What was written: architecture, per-layer shapes, types, fallbacks, size and time."""

    path: str
    arch: str
    source: str
    quant: str
    layers: list[dict]
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


def plan_types(layout: Layout, opts: GGUFOptions) -> tuple[dict[str, Q], list[str]]:
    """Each tensor's GGUF type for the Python-written file, and the fallbacks (one line each).

    Raises:
        ConfigError: an FFN width the quantization cannot hold (naming the layer and the fix).
    """
    block = BLOCK[opts.quant]
    types, fallbacks = {}, []
    for t in layout.tensors:
        if t.role == "vector":
            types[t.name] = Q.F32
            continue
        ne0 = t.shape[-1]
        types[t.name] = _WEIGHT_TYPE[opts.quant]
        if ne0 % block == 0:
            continue
        if t.role == "ffn_down" and t.source is not None and not opts.allow_fallback:  # zeros are exact anywhere
            layer = t.name.split(".")[1]
            raise ConfigError(
                f"layer {layer}'s FFN width {ne0} is not a multiple of {block}, which {opts.quant} needs for ffn_down's "
                f"rows: prune with --width-multiple {block} (structured pruning's default where the dense width "
                f"allows it), or pass --allow-fallback to store such tensors as llama.cpp's fallback type")
        fb = _fallback(opts.quant, ne0)
        fallbacks.append(f"{t.name}: rows of {ne0} not a multiple of {block} -> {fb}")
        if opts.quant == "q8_0":
            types[t.name] = Q.F16
    return types, fallbacks


def _fallback(quant: str, ne0: int) -> str:
    if quant == "q8_0" or ne0 % 32:
        return "f16"
    return "q5_0 (q6_k rows: q8_0)"


def _metadata(w: gguf.GGUFWriter, model: nn.Module, layout: Layout, opts: GGUFOptions, name: str) -> None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    L = layout.layers
    per = (lambda f: [f(x) for x in L]) if not layout.uniform else (lambda f: f(L[0]))
    w.add_type("model")
    w.add_name(name)
    w.add_block_count(len(L))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(layout.hidden)
    w.add_feed_forward_length(per(lambda x: x.ffn))
    w.add_head_count(per(lambda x: x.heads))
    w.add_head_count_kv(per(lambda x: x.kv_heads))
    w.add_key_length(layout.head_dim)
    w.add_value_length(layout.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(layout.vocab)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    full = rope.get("full_attention", rope)
    w.add_rope_freq_base(float(full["rope_theta"]))
    if layout.arch in ("llama", "deci"):
        w.add_rope_dimension_count(layout.head_dim)
    if layout.arch == "gemma3":
        if "sliding_attention" in rope:
            w.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(int(cfg.sliding_window))
            types = getattr(cfg, "layer_types", None) or []
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    w.add_file_type(int(FILE_TYPE["f32" if opts.quant == "q4_k_m" else opts.quant]))
    if opts.quant in ("q8_0",):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _values(model_state: dict, t: Tensor_) -> torch.Tensor:
    if t.source is None:
        return torch.zeros(t.shape)
    v = model_state[t.source].detach().float()
    if t.permute_heads:
        v = permute_rows(v, t.permute_heads)
    if t.add_one:
        v = v + 1.0
    return v.contiguous()


def _encode(v: torch.Tensor, qtype: Q) -> np.ndarray:
    a = v.numpy()
    if qtype == Q.F32:
        return a.astype(np.float32, copy=False)
    return gguf.quants.quantize(a, qtype)


def _info_shape(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype, int]:
    n = int(np.prod(shape))
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), 4 * n
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), 2 * n
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def write_gguf_file(model: nn.Module, tokenizer, layout: Layout, types: dict[str, Q], opts: GGUFOptions,
                    path: Path, name: str) -> dict[str, int]:
    """Stream ``model`` into ``path`` (metadata, vocabulary, tensor infos, then one tensor at a time)."""
    vocab = vocab_from_tokenizer(tokenizer, layout.vocab, opts.tokenizer_pre)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[layout.gguf_arch])
    _metadata(w, model, layout, opts, name)
    vocab.write(w)
    extra = []
    if layout.rope_freqs is not None:
        extra.append(("rope_freqs.weight", layout.rope_freqs.numpy().astype(np.float32)))
    for t in layout.tensors:
        shape, dt, nbytes = _info_shape(t.shape, types[t.name])
        w.add_tensor_info(t.name, shape, dt, nbytes, raw_dtype=types[t.name] if dt == np.uint8 else None)
    for n, a in extra:
        w.add_tensor_info(n, a.shape, a.dtype, a.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    state = model.state_dict()
    counts: dict[str, int] = {}
    for t in layout.tensors:
        w.write_tensor_data(_encode(_values(state, t), types[t.name]))
        counts[types[t.name].name] = counts.get(types[t.name].name, 0) + 1
    for _, a in extra:
        w.write_tensor_data(a)
        counts["F32"] = counts.get("F32", 0) + 1
    w.close()
    return counts


_FALLBACK_LINE = re.compile(r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                            r".*?falling back to\s+(\S+)")


def quantize_k(src: Path, dst: Path, threads: int) -> tuple[dict[str, int], list[str]]:
    """``llama-quantize SRC DST Q4_K_M``; the tensor types it chose and its fallback lines."""
    from .llamacpp import binary

    proc = subprocess.run([str(binary("llama-quantize")), str(src), str(dst), "Q4_K_M", str(threads)],
                          capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0 or not dst.is_file():
        raise RuntimeError(f"llama-quantize failed ({proc.returncode}): {text.strip()[-1500:]}")
    fallbacks = [f"{m[0]}: rows of {m[1]} not a multiple of {m[2]} ({m[3]}) -> {m[4]}" for m in _FALLBACK_LINE.findall(text)]
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(dst)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts, fallbacks


def precheck(folder: str | os.PathLike, opts: GGUFOptions) -> None:
    """The refusals that a folder's ``config.json`` (and structured manifest) already decide, before loading.

    Raises:
        ConfigError: an unsupported model type, an FFN width the quantization cannot hold, or
            ``llama-quantize`` missing for ``q4_k_m``.
    """
    import json

    from .gguf_arch import SOURCES

    folder = Path(folder).expanduser()
    cfg_file = folder / "config.json"
    if folder.is_dir() and cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg = {**cfg, **cfg.get("text_config", {})}
        if cfg.get("model_type") not in SOURCES:
            raise ConfigError(f"GGUF export supports model types {', '.join(SOURCES)}; {str(folder)!r} is "
                              f"{cfg.get('model_type')!r}")
        widths = _ffn_widths(folder, cfg)
        block = BLOCK[opts.quant]
        bad = [(i, w) for i, w in enumerate(widths) if w and w % block]
        if bad and not opts.allow_fallback:
            i, w = bad[0]
            raise ConfigError(
                f"layer {i}'s FFN width {w} is not a multiple of {block}, which {opts.quant} needs for ffn_down's "
                f"rows: prune with --width-multiple {block} (structured pruning's default where the dense width "
                f"allows it), or pass --allow-fallback to store such tensors as llama.cpp's fallback type")
    if opts.quant == "q4_k_m":
        from .llamacpp import binary

        binary("llama-quantize")


def _ffn_widths(folder: Path, cfg: dict) -> list[int]:
    """Per-layer FFN widths from a prunekit structured manifest, else the config's one width."""
    import json

    man = folder / STRUCTURED_MANIFEST
    if man.is_file():
        lin = json.loads(man.read_text()).get("linears", {})
        return [v["in"] for k, v in sorted(lin.items(), key=lambda kv: _layer_of(kv[0])) if k.endswith("down_proj")]
    w = cfg.get("intermediate_size")
    return [int(w)] * int(cfg.get("num_hidden_layers", 0)) if isinstance(w, int) else []


def _layer_of(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def export_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, opts: GGUFOptions | None = None,
                overwrite: bool = False, name: str | None = None) -> ExportReport:
    """Write ``model`` as a GGUF file llama.cpp runs; every refusal happens before any conversion.

    Raises:
        ConfigError: the output exists (without ``overwrite``), an unsupported architecture or
            feature, an FFN width the quantization cannot hold, or llama.cpp's quantizer missing for
            ``q4_k_m``.
    """
    opts = opts or GGUFOptions()
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ConfigError(f"output {str(out)!r} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {str(out.parent)!r} does not exist")
    if lowrank_modules(model):
        log.info("merged %d low-rank modules into dense weights for GGUF", merge_lowrank(model))
    layout = describe(model)
    types, fallbacks = plan_types(layout, opts)
    vocab_from_tokenizer(tokenizer, layout.vocab, opts.tokenizer_pre)  # its refusals, before any conversion
    if opts.quant == "q4_k_m":
        from .llamacpp import binary

        binary("llama-quantize")
    t0 = time.perf_counter()
    name = name or getattr(model.config, "_name_or_path", None) or "prunekit model"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if opts.quant == "q4_k_m":
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=".prunekit-gguf-") as d:
                f32 = Path(d) / "f32.gguf"
                write_gguf_file(model, tokenizer, layout, types, opts, f32, Path(name).name)
                counts, fallbacks = quantize_k(f32, tmp, opts.threads)
        else:
            counts = write_gguf_file(model, tokenizer, layout, types, opts, tmp, Path(name).name)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    rep = ExportReport(str(out), layout.arch, layout.source, opts.quant, [vars(x) for x in layout.layers], counts,
                       fallbacks, out.stat().st_size, time.perf_counter() - t0)
    log.info("wrote %s (%s, %s, %.1f MB) in %.1fs", out, layout.arch, opts.quant, rep.bytes / 2**20, rep.seconds)
    return rep


#: the text :func:`verify` scores (any fixed English text; repeated to the asked length)
VERIFY_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
               "want of a wife. However little known the feelings or views of such a man may be on his first entering "
               "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
               "considered the rightful property of some one or other of their daughters. ")


def verify(model: nn.Module, tokenizer, path: str | os.PathLike, tokens: int = 128, threads: int = 2) -> dict:
    """llama.cpp's logits of the written file against ``model``'s on the same ``tokens`` ids (one sequence).

    Returns top-1 agreement (share of positions whose most likely next token is the same), the
    largest absolute logit difference and the number of positions. Needs the cached llama.cpp build.
    """
    from .llamacpp import logits

    text = VERIFY_TEXT * (1 + tokens // 40)
    ids = torch.tensor(tokenizer(text)["input_ids"][:tokens])
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float().numpy()
    got = logits(path, ids.numpy(), threads=threads)
    return {"top1": float((got.argmax(-1) == ref.argmax(-1)).mean()), "max_abs": float(np.abs(got - ref).max()),
            "positions": int(len(ids))}


class GGUFFormat(Format):
    """One ``.gguf`` file: written for llama.cpp by :func:`export_gguf`, read (dequantized once into a
    cached safetensors folder) by :func:`prunekit.formats.gguf_read.materialized`."""

    name = "gguf"
    order = 40
    loader = "llama.cpp, or prunekit.load_model (dequantized once into the prunekit cache)"

    def detect(self, path: str | os.PathLike) -> bool:
        p = Path(path)
        return p.is_file() and p.suffix == ".gguf"

    def check(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        """Nothing before loading: the file is read by transformers' GGUF reader, which checks it."""

    def save(self, model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
             overwrite: bool = False) -> tuple[Path, str]:
        """Write ``out_dir`` (a file name ending in ``.gguf``) as float32 GGUF; the report is not stored."""
        rep = export_gguf(model, tokenizer, out_dir, overwrite=overwrite)
        return Path(rep.path), f"GGUF ({rep.arch}, {rep.quant}): run it with {self.loader}"

    def load(self, path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> nn.Module:
        p = Path(path)
        folder = materialized(ModelSource(str(p.parent), p.name)).path
        return DENSE.load(folder, dtype, trust_remote_code, allow_pickle)


GGUF = FORMATS.add("gguf", GGUFFormat(), help="one .gguf file for llama.cpp (prunekit export --to gguf)")
