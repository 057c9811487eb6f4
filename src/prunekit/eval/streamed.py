"""Perplexity of a model that does not fit in memory: all windows through block i, then block i + 1.

The same protocol and the same numbers as :func:`prunekit.eval.perplexity.perplexity` (the windows
are batched the same way and every block runs the same computation on them), but only one block's
weights are in memory at a time (:class:`~prunekit.models.lazy.LazyModel`). Windows are processed
in chunks whose hidden states fit a memory budget; each chunk reads the blocks once more.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch

from ..calibration.context import calibration_forward_context, capture_block_inputs, logits_from_last_hidden
from ..errors import ConfigError
from ..models import find_blocks
from ..models.lazy import LazyModel
from .perplexity import PerplexityResult, check_seqlen, eval_token_ids, shifted_nll

log = logging.getLogger(__name__)


def chunk_windows(n_windows: int, seqlen: int, hidden: int, batch_size: int, budget_bytes: int) -> int:
    """Windows per chunk: as many as fit the budget in float32 hidden states (a multiple of the batch)."""
    per_window = seqlen * hidden * 4 * 2  # the states and the next block's output while it is computed
    n = max(batch_size, budget_bytes // per_window // batch_size * batch_size)
    return min(n, n_windows)


def streamed_last_hidden(lazy: LazyModel, windows: torch.Tensor, batch_size: int):
    """The last block's outputs for ``windows``, blocks read one at a time; and the block output form."""
    model = lazy.model
    path, blocks = find_blocks(model)
    lazy.load(f"{path}.0")  # block 0 runs once during the capture to show what a block returns
    try:
        inputs = capture_block_inputs(model, blocks, windows, batch_size, lazy.device)
    finally:
        lazy.release(f"{path}.0")
    for idx, block in enumerate(blocks):
        lazy.load(f"{path}.{idx}")
        for b in range(inputs.batches):
            inputs.hidden[b] = inputs.call(idx, block, b)
        lazy.release(f"{path}.{idx}")
    return inputs.hidden, inputs.returns


def perplexity_streamed(lazy: LazyModel, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048,
                        max_windows: int | None = None, batch_size: int = 1, data_dir=None,
                        progress: Callable[[int, int], None] | None = None, token_cache: dict | None = None,
                        budget_bytes: int = 1 << 30) -> PerplexityResult:
    """:func:`~prunekit.eval.perplexity.perplexity` for a :class:`LazyModel`."""
    model = lazy.model
    check_seqlen(model, seqlen)
    ids = eval_token_ids(tokenizer, dataset, seqlen, data_dir, cache=token_cache).reshape(-1)
    n_windows = ids.numel() // seqlen if max_windows is None else min(ids.numel() // seqlen, max_windows)
    if n_windows == 0:
        raise ConfigError(f"{dataset}: {ids.numel()} tokens is less than one window of seqlen={seqlen}; lower the seqlen")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    path, blocks = find_blocks(model)
    lazy.load(exclude=(path + ".",))
    chunk = chunk_windows(n_windows, seqlen, model.config.get_text_config().hidden_size, batch_size, budget_bytes)
    total_nll, t0 = 0.0, time.perf_counter()
    with calibration_forward_context(model):
        for start in range(0, n_windows, chunk):
            part = windows[start: start + chunk].to(lazy.device)
            last, returns = streamed_last_hidden(lazy, part, batch_size)
            for b, s in enumerate(range(0, part.shape[0], batch_size)):
                batch = part[s: s + batch_size]
                total_nll += shifted_nll(logits_from_last_hidden(model, blocks, batch, last[b], returns), batch)
            if progress is not None:
                progress(min(start + chunk, n_windows), n_windows)
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
