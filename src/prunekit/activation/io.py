"""Deprecated import path: the threshold side files are a registered format now, in
:mod:`prunekit.formats.activation` (detect, save, load); importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import activation

    return moved(__name__, name, activation)
