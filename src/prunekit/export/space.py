"""Deprecated import path: moved to prunekit.formats.space; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import space

    return moved(__name__, name, space)
