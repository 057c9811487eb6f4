"""Deprecated import path: moved to prunekit.formats.structured; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import structured

    return moved(__name__, name, structured)
