"""Deprecated import path: moved to prunekit.formats.compressed_read; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import compressed_read

    return moved(__name__, name, compressed_read, renames={'_ST_DTYPES': 'ST_DTYPES'})
