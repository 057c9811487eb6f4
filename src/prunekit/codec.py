"""Deprecated import path: moved to prunekit.formats.codec; importing names from here warns."""

from ._deprecated import moved


def __getattr__(name: str):
    from .formats import codec

    return moved(__name__, name, codec)
