"""Deprecated import path: moved to prunekit.formats.lazy; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import lazy

    return moved(__name__, name, lazy, renames={'_ST_DTYPES': 'ST_DTYPES'})
