"""Deprecated import path: moved to prunekit.formats; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from .. import formats

    return moved(__name__, name, formats)
