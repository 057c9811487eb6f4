"""Deprecated import path: moved to prunekit.formats.save; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import save, sizes

    return moved(__name__, name, save, sizes)
