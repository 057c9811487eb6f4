"""Deprecated import path: loading moved to prunekit.formats.load (sources to .sources, GGUF conversion to
.gguf_read, weight-file checks to .base), dtype and device resolution to prunekit.models.runtime;
importing names from here warns."""

from .._deprecated import moved

_RENAMES = {"_gguf_cache_dir": "gguf_cache_dir", "_convert_gguf": "convert_gguf", "_materialized": "materialized",
            "_pickle_files": "pickle_files"}


def __getattr__(name: str):
    from ..formats import base, gguf_read, load, sources
    from . import runtime

    return moved(__name__, name, load, sources, gguf_read, base, runtime, renames=_RENAMES)
