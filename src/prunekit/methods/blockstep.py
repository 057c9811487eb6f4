"""What a block-level post-step (block reconstruction) asks of the engine, and what it is given.

The sequential engine (:mod:`prunekit.calibration.engine`) compresses one decoder block at a time.
A method that also wants to *fit the compressed block to the dense one* returns a
:class:`BlockNeeds` from :meth:`~prunekit.methods.base.Method.block_needs`; the engine then keeps,
for every block:

* ``dense_stream`` — the *dense model's* hidden states entering the block, carried beside the
  compressed model's as a second stream of activations (one extra forward of the dense block per
  block), and the dense block's outputs on them: the dense model's own activations after the block;
* ``local_targets`` — the dense block's outputs on the *compressed* model's inputs to it (gathered
  by the statistics pass, which then runs every batch to the end instead of stopping early);

and calls :meth:`~prunekit.methods.base.Method.refine_block` with a :class:`BlockData` after the
block's linears are compressed and before its outputs are propagated to the next block. Both
streams live where the engine keeps its activations (in memory, or spilled to disk when streaming).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor, nn


@dataclass(frozen=True)
class BlockNeeds:
    """The activations a block step needs the engine to keep (see the module docstring)."""

    dense_stream: bool = False
    local_targets: bool = False


@dataclass
class BlockData:
    """One compressed block and its calibration activations, for a block step.

    ``inputs[b]`` is calibration batch ``b`` as the compressed model feeds the block;
    ``dense_inputs`` / ``dense_outputs`` are the dense model's activations before / after the block
    (``None`` unless ``dense_stream`` was asked for); ``local_targets[b]`` the dense block's output
    on ``inputs[b]`` (``None`` unless asked for). ``run(b, hidden, rows)`` runs the block on
    ``hidden`` (a whole batch, shaped like ``inputs[b]``) with everything else the model passes it
    with batch ``b`` (masks, rotary tables); ``rows`` (a slice) restricts both to a micro-batch.
    """

    index: int
    block: nn.Module
    modules: dict[str, nn.Module]
    run: Callable[[int, Tensor, slice | None], Tensor]
    inputs: Sequence[Tensor]
    dense_inputs: Sequence[Tensor] | None = None
    dense_outputs: Sequence[Tensor] | None = None
    local_targets: Sequence[Tensor] | None = None

    @property
    def batches(self) -> int:
        return len(self.inputs)
