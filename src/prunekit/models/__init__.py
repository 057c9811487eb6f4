"""Model loading, decoder-block discovery and the linear-layer view; nothing else in prunekit
knows where a model keeps its blocks."""

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
from .loading import clear_quantizer, load_model, model_device, resolve_device, resolve_dtype, resolve_source

__all__ = [
    "UnsupportedModelError", "block_lookup", "check_finite", "block_linears", "clear_quantizer", "context_length",
    "decoder_linears", "find_blocks", "in_features", "is_linear", "load_model", "out_features",
    "model_device", "resolve_device", "resolve_dtype", "resolve_source", "set_module", "set_weight",
    "weight_fp32", "weight_view",
]
