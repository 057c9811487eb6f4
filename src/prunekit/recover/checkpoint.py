"""Resumable training state: one file, replaced atomically, loadable with ``weights_only=True``.

A checkpoint holds everything an uninterrupted run would still have in memory: the trainable
parameters, the optimizer state (GaLore projectors as tensors), the learning-rate scheduler,
torch's and Python's random states, the step reached (the data order is a pure function of the
step, :func:`prunekit.recover.data.batch_indices`), the history so far and the settings that
shape the trajectory. Resuming with the same seed and thread count gives bit-identical weights.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "prunekit-recover-checkpoint"
FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(folder: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``folder/state.pt`` atomically (a crash mid-write keeps the old one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.tmp-", dir=folder)
    os.close(fd)
    try:
        torch.save({"format": FORMAT, "version": 1, **payload}, tmp)
        os.replace(tmp, folder / FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / FILE


def load_checkpoint(folder: str | os.PathLike | None, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``folder`` if there is one, after checking it belongs to this run.

    Args:
        folder: the checkpoint folder (``None``: no checkpointing).
        expect: ``{"config": ..., "student": ...}`` that must equal what the checkpoint recorded.

    Raises:
        ConfigError: the checkpoint was written by a run with other settings or another student.
    """
    if folder is None or not (Path(folder) / FILE).is_file():
        return None
    path = Path(folder) / FILE
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which and what to do
        raise ConfigError(f"checkpoint {str(path)!r} cannot be read ({e}); delete {str(folder)!r} to start over") from None
    if payload.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a prunekit recovery checkpoint; delete {str(folder)!r} or choose another --out")
    for key, want in expect.items():
        have = payload.get(key)
        if have != want:
            diff = _first_difference(have, want)
            raise ConfigError(f"checkpoint {str(folder)!r} belongs to another run ({key} differs: {diff}); rerun with "
                              f"the same settings to resume, or delete the folder (--restart) to start over")
    log.info("resuming from %s at step %d", path, payload["step"])
    return payload


def _first_difference(have: Any, want: Any) -> str:
    if isinstance(have, dict) and isinstance(want, dict):
        for k in sorted(set(have) | set(want)):
            if have.get(k) != want.get(k):
                return f"{k}={have.get(k)!r} in the checkpoint vs {want.get(k)!r} now"
    return f"{have!r} vs {want!r}"
