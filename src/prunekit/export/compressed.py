"""Deprecated import path: moved to prunekit.formats.compressed_write; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import compressed_write

    return moved(__name__, name, compressed_write)
