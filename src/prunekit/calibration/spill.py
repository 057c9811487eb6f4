"""Calibration activations kept on disk: a streamed prune's memory no longer grows with calibration.

The engine holds every calibration batch's hidden states between blocks (``BlockInputs.hidden``):
128 x 2048 tokens of a 4096-wide model are 4.3 GB in float32, more than the block being pruned. A
:class:`SpilledTensors` is a list of tensors stored in one anonymous temporary file (unlinked at
once: nothing is left behind, even after a crash) and read back with positioned reads, so only the
batch being worked on is in memory. Bytes go through unchanged: a spilled run computes exactly
what an in-memory run does.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor


@dataclass(frozen=True)
class _Slot:
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class SpilledTensors:
    """A list of tensors in a temporary file under ``folder``: ``append``, ``[i]``, ``[i] = t``, ``len``.

    Reading ``[i]`` returns a fresh tensor on the device it was stored from. Assigning a tensor of
    the same size overwrites its slot in place (the engine replaces each batch's inputs by the
    block's outputs, of the same shape); any other size is written at the end of the file.
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(prefix="prunekit-activations-", dir=folder)
        self._slots: list[_Slot] = []
        self._end = 0

    def _write(self, t: Tensor, offset: int) -> _Slot:
        data = t.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        view, done = memoryview(raw), 0
        while done < len(view):
            done += _pwrite(self._file, view[done:], offset + done)
        return _Slot(offset, len(view), tuple(t.shape), t.dtype, t.device)

    def append(self, t: Tensor) -> None:
        slot = self._write(t, self._end)
        self._end += slot.nbytes
        self._slots.append(slot)

    def __setitem__(self, index: int, t: Tensor) -> None:
        old = self._slots[index]
        nbytes = t.numel() * t.element_size()
        if nbytes == old.nbytes:
            self._slots[index] = self._write(t, old.offset)
        else:
            self._slots[index] = self._write(t, self._end)
            self._end += nbytes

    def __getitem__(self, index: int) -> Tensor:
        slot = self._slots[index]
        out = torch.empty(slot.shape, dtype=slot.dtype)
        view, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        while done < slot.nbytes:
            n = _pread_into(self._file, view[done:], slot.offset + done)
            if n == 0:
                raise OSError(f"the activation file ended early at byte {slot.offset + done} (the disk is damaged?)")
            done += n
        return out if slot.device.type == "cpu" else out.to(slot.device)

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        """Bytes the stored tensors take (the file may be larger after size-changing assignments)."""
        return sum(s.nbytes for s in self._slots)

    def close(self) -> None:
        self._file.close()

    def __del__(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


def _pwrite(f, data: memoryview, offset: int) -> int:
    if hasattr(os, "pwrite"):
        return os.pwrite(f.fileno(), data, offset)
    f.seek(offset)  # no positioned I/O (Windows): the engine is single-threaded here
    return f.write(data)


def _pread_into(f, buf: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(f.fileno(), [buf], offset)
    f.seek(offset)
    return f.readinto(buf)
