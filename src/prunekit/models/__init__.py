"""Decoder-block discovery, the linear-layer view, the low-rank module and run-time helpers; nothing else
in prunekit knows where a model keeps its blocks. (Loading moved to :mod:`prunekit.formats`.)"""

from .._deprecated import moved
from .blocks import (
    UnsupportedModelError,
    block_lookup,
    block_linears,
    context_length,
    decoder_linears,
    find_blocks,
    set_module,
)
from .checks import check_finite
from .linear import in_features, is_linear, out_features, set_weight, weight_fp32, weight_view
from .runtime import clear_quantizer, cpu_has_bf16, fast_amp, model_device, resolve_device, resolve_dtype

__all__ = [
    "UnsupportedModelError", "block_lookup", "check_finite", "block_linears", "clear_quantizer", "context_length",
    "cpu_has_bf16", "decoder_linears", "fast_amp", "find_blocks", "in_features", "is_linear", "out_features",
    "model_device", "resolve_device", "resolve_dtype", "set_module", "set_weight",
    "weight_fp32", "weight_view",
]

_MOVED = ("load_model", "resolve_source", "load_tokenizer", "model_folder", "ModelSource", "cache_root", "LOAD_HOOKS")


def __getattr__(name: str):
    """``load_model`` and ``resolve_source`` moved to :mod:`prunekit.formats` (deprecated here)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .. import formats

    return moved(__name__, name, formats)
