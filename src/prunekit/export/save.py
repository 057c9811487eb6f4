"""Deprecated import path: moved to prunekit.formats.sizes and prunekit.formats.dense; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import dense, sizes

    return moved(__name__, name, sizes, dense)
