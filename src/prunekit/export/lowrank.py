"""Deprecated import path: moved to prunekit.formats.lowrank; importing names from here warns."""

from .._deprecated import moved


def __getattr__(name: str):
    from ..formats import dense, lowrank, save, state

    return moved(__name__, name, lowrank, dense, save, state, renames={'_unique_state': 'dedup_state'})
