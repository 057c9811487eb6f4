"""Where the decoder blocks live while the engine works on them.

:class:`InMemory` (the default): the whole model is in memory; when the compute device differs
from the model's (``--device cuda`` with the model on the CPU), each block visits the device while
it is processed, and the embedding stage visits it for the capture.

:class:`Streamed`: the model is a :class:`~prunekit.formats.lazy.LazyModel` skeleton; the modules
outside the blocks are read once, each block is read from the checkpoint when its turn comes,
handed to ``on_done`` (which writes it to the output shards) and released. Only one block's
weights are in memory at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move the parameters and buffers that live outside the decoder blocks to ``device``."""
    inside = {id(m) for m in blocks.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(device)
        for name, buf in mod.named_buffers(recurse=False):
            setattr(mod, name, buf.to(device))


class InMemory:
    """Every block in memory; blocks (and the embedding stage) visit ``device`` when it is not ``home``."""

    def __init__(self, device: torch.device, home: torch.device) -> None:
        self.device, self.home = device, home

    def linears(self, found: Mapping[str, nn.Module]) -> Mapping[str, nn.Module]:
        """The selected linears as :meth:`Method.prepare` sees them (here: the modules themselves)."""
        return found

    def activations(self) -> None:
        """Where the calibration hidden states live between blocks: ``None``, a list in memory."""
        return None

    @contextlib.contextmanager
    def capture(self, model: nn.Module, blocks: nn.ModuleList) -> Iterator[None]:
        """The embedding stage and block 0 (run once to learn a block's output form) on ``device``."""
        if self.device == self.home:
            yield
            return
        _move_outside_blocks(model, blocks, self.device)
        try:
            with self.block(0, blocks[0]):
                yield
        finally:
            _move_outside_blocks(model, blocks, self.home)

    @contextlib.contextmanager
    def block(self, index: int, block: nn.Module) -> Iterator[None]:
        if self.device == self.home:
            yield
            return
        block.to(self.device)
        try:
            yield
        finally:
            block.to(self.home)


class _LazyLinears(Mapping):
    """Selected linears whose weights are read from the checkpoint on access and released after."""

    def __init__(self, lazy, found: Mapping[str, nn.Module]) -> None:
        self.lazy, self.found = lazy, found

    def __getitem__(self, name: str) -> nn.Module:
        mod = self.found[name]
        weight = f"{name}.weight"
        src = self.lazy.checkpoint_name(weight)
        if mod.weight.device.type == "meta" and src is not None:
            tmp = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
            tmp.weight = nn.Parameter(self.lazy.source.get(src).to(self.lazy.dtype, copy=True), requires_grad=False)
            return tmp
        return mod

    def __iter__(self):
        return iter(self.found)

    def __len__(self) -> int:
        return len(self.found)


class Streamed:
    """Blocks read from a :class:`~prunekit.formats.lazy.LazyModel` one at a time, handed to ``on_done``
    after compression (to be written out), then released."""

    def __init__(self, lazy, blocks_path: str, on_done: Callable[[int, nn.Module], None] | None = None,
                 spill_dir: str | Path | None = None, spill: bool = True) -> None:
        self.lazy, self.path, self.on_done = lazy, blocks_path, on_done
        self.spill_dir, self.spill = spill_dir, spill
        self.device = lazy.device
        head = lazy.output_head()  # an untied LM head is never run by the engine: it stays on disk
        lazy.load(exclude=(blocks_path + ".",) + ((head + ".",) if head else ()))

    def linears(self, found: Mapping[str, nn.Module]) -> Mapping[str, nn.Module]:
        return _LazyLinears(self.lazy, found)

    def activations(self):
        """On disk (an unlinked file in ``spill_dir``): memory stays one block's working set whatever the
        calibration size (128 x 2048 tokens of a 4096-wide model are 4.3 GB of float32)."""
        from .spill import SpilledTensors

        return SpilledTensors(self.spill_dir) if self.spill else None

    @contextlib.contextmanager
    def capture(self, model: nn.Module, blocks: nn.ModuleList) -> Iterator[None]:
        self.lazy.load(f"{self.path}.0")  # block 0 runs once to show what a block returns
        try:
            yield
        finally:
            # the block loop needs none of it: the embeddings (0.9 GB for Qwen2.5-1.5B) are read again to be written
            self.lazy.release("")

    @contextlib.contextmanager
    def block(self, index: int, block: nn.Module) -> Iterator[None]:
        self.lazy.load(f"{self.path}.{index}")
        yield
        if self.on_done is not None:
            self.on_done(index, block)
        self.lazy.release(f"{self.path}.{index}")
