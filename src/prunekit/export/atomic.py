"""Deprecated import path: moved to prunekit.formats.atomic; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import atomic

    return moved(__name__, name, atomic)
