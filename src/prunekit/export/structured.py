"""Deprecated import path: moved to prunekit.formats.structured; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import structured, structured_plain

    return moved(__name__, name, structured, structured_plain, renames={'_meta_shapes': 'meta_shapes', '_shapes': 'tensor_shapes'})
