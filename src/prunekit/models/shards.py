"""Deprecated import path: moved to prunekit.formats.shards; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import shards

    return moved(__name__, name, shards)
