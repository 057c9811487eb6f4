"""Evaluating a model that does not fit in memory: all sequences through block i, then block i + 1.

The same protocols and the same numbers as the in-memory evaluation (the sequences are batched the
same way and every block runs the same computation on them), but only one block's weights are in
memory at a time (:class:`~prunekit.models.lazy.LazyModel`). Sequences are processed in chunks
whose hidden states fit a memory budget; each chunk reads the blocks once more. Perplexity and
log-likelihood scoring (multiple-choice tasks) work this way; greedy generation cannot (every new
token needs every block) and says so.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterator

from torch import Tensor

from ..calibration.context import calibration_forward_context, capture_batches, logits_from_last_hidden
from ..errors import ConfigError
from ..models import find_blocks
from ..models.lazy import LazyModel
from .perplexity import PerplexityResult, check_seqlen, eval_token_ids, shifted_nll

log = logging.getLogger(__name__)

BUDGET = 1 << 30  # bytes of hidden states held per chunk of sequences


def _walk(lazy: LazyModel, batches: list[dict[str, Tensor]]):
    """The last block's outputs for ``batches``, blocks read one at a time; and the block output form."""
    model = lazy.model
    path, blocks = find_blocks(model)
    lazy.load(f"{path}.0")  # block 0 runs once during the capture to show what a block returns
    try:
        inputs = capture_batches(model, blocks, batches)
    finally:
        lazy.release(f"{path}.0")
    for idx, block in enumerate(blocks):
        lazy.load(f"{path}.{idx}")
        for b in range(inputs.batches):
            inputs.hidden[b] = inputs.call(idx, block, b)
        lazy.release(f"{path}.{idx}")
    return inputs.hidden, inputs.returns


def streamed_logits(lazy: LazyModel, batches: list[dict[str, Tensor]], budget_bytes: int = BUDGET) -> Iterator[Tensor]:
    """The model's logits for every batch of inputs, in order, one block of weights in memory at a time."""
    model = lazy.model
    path, blocks = find_blocks(model)
    lazy.load(exclude=(path + ".",))
    hidden = model.config.get_text_config().hidden_size
    with calibration_forward_context(model):
        chunk: list[dict[str, Tensor]] = []
        size = 0
        for i, batch in enumerate(batches):
            chunk.append({k: v.to(lazy.device) for k, v in batch.items()})
            size += batch["input_ids"].numel() * hidden * 4 * 2  # the states and the next block's output
            if size >= budget_bytes or i == len(batches) - 1:
                last, returns = _walk(lazy, chunk)
                for b, h in zip(chunk, last):
                    yield logits_from_last_hidden(model, blocks, b, h, returns)
                chunk, size = [], 0


def perplexity_streamed(lazy: LazyModel, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048,
                        max_windows: int | None = None, batch_size: int = 1, data_dir=None,
                        progress: Callable[[int, int], None] | None = None, token_cache: dict | None = None,
                        budget_bytes: int = BUDGET) -> PerplexityResult:
    """:func:`~prunekit.eval.perplexity.perplexity` for a :class:`LazyModel`."""
    check_seqlen(lazy.model, seqlen)
    ids = eval_token_ids(tokenizer, dataset, seqlen, data_dir, cache=token_cache).reshape(-1)
    n_windows = ids.numel() // seqlen if max_windows is None else min(ids.numel() // seqlen, max_windows)
    if n_windows == 0:
        raise ConfigError(f"{dataset}: {ids.numel()} tokens is less than one window of seqlen={seqlen}; lower the seqlen")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    batches = [{"input_ids": windows[s: s + batch_size]} for s in range(0, n_windows, batch_size)]
    total_nll, t0 = 0.0, time.perf_counter()
    for k, (batch, logits) in enumerate(zip(batches, streamed_logits(lazy, batches, budget_bytes))):
        total_nll += shifted_nll(logits, batch["input_ids"].to(logits.device))
        if progress is not None:
            progress(min((k + 1) * batch_size, n_windows), n_windows)
    secs = time.perf_counter() - t0
    tokens = n_windows * (seqlen - 1)
    mean_nll = total_nll / tokens
    if not math.isfinite(mean_nll):
        raise ConfigError(f"{dataset}: the model's log-likelihood is {mean_nll} (NaN/Inf logits); the weights or the "
                          "dtype overflow are broken: try --dtype float32 or reload the model")
    ppl = math.exp(mean_nll) if mean_nll < 700 else float("inf")
    log.info("%s (streamed): ppl %.4f (seqlen %d, %d windows, %.0f tok/s)", dataset, ppl, seqlen, n_windows,
             n_windows * seqlen / secs)
    return PerplexityResult(dataset, ppl, mean_nll, seqlen, n_windows, tokens, secs, n_windows * seqlen / secs)
