"""Deprecated import path: moved to prunekit.formats.tokenizer_match; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import tokenizer_match

    return moved(__name__, name, tokenizer_match)
