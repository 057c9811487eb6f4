"""Evaluating a model that does not fit in memory: all sequences through block i, then block i + 1.

The same protocols and the same numbers as the in-memory evaluation (the sequences are batched the
same way and every block runs the same computation on them), but only one block's weights are in
memory at a time (:class:`~prunekit.formats.lazy.LazyModel`). Sequences are processed in chunks
whose hidden states fit a memory budget; each chunk reads the blocks once more. Perplexity and
log-likelihood scoring (multiple-choice tasks) work this way; greedy generation cannot (every new
token needs every block) and says so.
"""

from __future__ import annotations

import logging
from typing import Iterator

from torch import Tensor

from ..calibration.context import calibration_forward_context, capture_batches, logits_from_last_hidden
from ..models import find_blocks
from ..formats.lazy import LazyModel, module_name

log = logging.getLogger(__name__)

BUDGET = 1 << 30  # bytes of hidden states held per chunk of sequences


def _walk(lazy: LazyModel, batches: list[dict[str, Tensor]]):
    """The last block's outputs for ``batches``, blocks read one at a time; and the block output form.

    The modules outside the blocks must be loaded for the capture; they are released right after it."""
    model = lazy.model
    path, blocks = find_blocks(model)
    lazy.load(f"{path}.0")  # block 0 runs once during the capture to show what a block returns
    try:
        inputs = capture_batches(model, blocks, batches)
    finally:
        lazy.release("")  # the embeddings too: the block loop needs one block only
    for idx, block in enumerate(blocks):
        lazy.load(f"{path}.{idx}")
        for b in range(inputs.batches):
            inputs.hidden[b] = inputs.call(idx, block, b)
        lazy.release(f"{path}.{idx}")
    return inputs.hidden, inputs.returns


def _chunks(batches: list[dict[str, Tensor]], budget_bytes: int, width: int, device) -> Iterator[list]:
    """Consecutive batches whose hidden states (and the next block's outputs) fit ``budget_bytes``."""
    chunk: list[dict[str, Tensor]] = []
    size = 0
    for i, batch in enumerate(batches):
        chunk.append({k: v.to(device) for k, v in batch.items()})
        size += batch["input_ids"].numel() * width * 4 * 2
        if size >= budget_bytes or i == len(batches) - 1:
            yield chunk
            chunk, size = [], 0


def streamed_logits(lazy: LazyModel, batches: list[dict[str, Tensor]], budget_bytes: int | None = None) -> Iterator[Tensor]:
    """The model's logits for every batch of inputs, in order, one block of weights in memory at a time.

    The input embeddings are in memory only for the capture, an untied LM head only while the logits
    are computed (with zero input embeddings: every block is skipped then), so the two large
    matrices of a big-vocabulary model are never resident together."""
    budget_bytes = BUDGET if budget_bytes is None else budget_bytes
    model = lazy.model
    path, blocks = find_blocks(model)
    head = lazy.output_head()
    emb = module_name(model, model.get_input_embeddings()) if head else None
    width = model.config.get_text_config().hidden_size
    with calibration_forward_context(model):
        for chunk in _chunks(batches, budget_bytes, width, lazy.device):
            lazy.load(exclude=(path + ".",) + ((head + ".",) if head else ()))
            last, returns = _walk(lazy, chunk)
            lazy.load(exclude=(path + ".",) + ((emb + ".",) if emb else ()))
            try:
                for b, h in zip(chunk, last):
                    yield logits_from_last_hidden(model, blocks, b, h, returns, zero_embeddings=emb is not None)
            finally:
                lazy.release("")
