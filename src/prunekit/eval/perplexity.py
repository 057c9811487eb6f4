"""Perplexity by the literature's protocol (SparseGPT/Wanda ``eval_ppl``).

The evaluation text is tokenized once, cut into non-overlapping windows of ``seqlen`` tokens
(the remainder is dropped), and each window is scored independently:
``ppl = exp(mean token NLL over all shifted targets of all windows)``. Windows may be batched —
each is still scored on its own, so the number does not depend on the batch size.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration import calibration_forward_context
from ..data import get_dataset, tokenize
from ..models import context_length, model_device
from ..errors import ConfigError
from ..options import check_int

log = logging.getLogger(__name__)

@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    nll: float  # mean token negative log-likelihood (nats)
    seqlen: int
    windows: int
    tokens: int  # scored target tokens
    seconds: float
    tokens_per_s: float  # input tokens through the model per second

    def to_dict(self) -> dict:
        return asdict(self)


def shifted_nll(logits: Tensor, ids: Tensor, chunk: int = 256, first: int = 0) -> float:
    """Summed next-token NLL, in float32, a few hundred positions at a time so that the float32
    copy of the logits never exceeds ``chunk x vocab`` per sequence (1 GB saved at 2048 x 128k).
    ``first``: the first position whose prediction is scored (the targets from ``first + 1`` on)."""
    total = 0.0
    n = ids.shape[1] - 1
    for c in range(first, n, chunk):
        lg = logits[:, c : min(c + chunk, n)]
        total += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), ids[:, c + 1 : c + 1 + lg.shape[1]].reshape(-1),
                                       reduction="sum"))
    return total


_MAX_NLL = 709.0  # exp(709.78) is the largest float64: a perplexity above it is inf, not a measurement


def _check_window(nll: float, name: str, first: int, count: int, seqlen: int, scored: int | None = None) -> None:
    """One line naming the window(s) whose log-loss is NaN/Inf (or too large for a perplexity) and a likely cause.

    A perplexity of ``inf`` or ``nan`` is not a result: it means the logits overflowed or the
    weights hold NaN/Inf, so every number of the run would be meaningless.
    """
    mean = nll / max(1, count * (seqlen - 1 if scored is None else scored))
    if mean < _MAX_NLL:
        return
    which = f"window {first}" if count == 1 else f"windows {first}-{first + count - 1}"
    raise ConfigError(f"{name}: {which} (tokens {first * seqlen}-{(first + count) * seqlen - 1}) have a mean log-loss "
                      f"of {mean:.4g} nats/token, so the perplexity would be {'nan' if mean != mean else 'inf'} and "
                      "means nothing; likely causes: NaN/Inf weights (a damaged model: reload it) or float16/bfloat16 "
                      "overflow (try --dtype float32)")


def check_seqlen(model: nn.Module, seqlen: int, what: str = "seqlen") -> None:
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise ConfigError(
            f"{what}={seqlen} exceeds the model's context length {limit} (max_position_embeddings); "
            f"use a {what} <= {limit}"
        )


def _logits(model: nn.Module, batches: list[Tensor]):
    """Logits of each batch: one forward each, or — for a model streamed from disk — all batches
    through one block at a time (:func:`prunekit.eval.streamed.streamed_logits`), the same numbers."""
    lazy = getattr(model, "prunekit_lazy", None)
    if lazy is None:
        return (model(input_ids=b, use_cache=False).logits for b in batches)
    from .streamed import streamed_logits

    return streamed_logits(lazy, [{"input_ids": b} for b in batches])


def perplexity_of_ids(
    model: nn.Module,
    ids: Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    name: str = "ids",
    prompt: int = 0,
) -> PerplexityResult:
    """Perplexity of a 1-D token stream ``ids`` by non-overlapping ``seqlen`` windows.

    ``prompt > 0``: the first ``prompt`` tokens of each window are a prompt, prefilled densely if the
    model has activation thresholds (they apply to the tokens after it, as in generation), and only
    the tokens after the prompt are scored — TEAL's protocol with ``prompt = seqlen // 2``.
    """
    check_seqlen(model, seqlen)
    check_int("prompt", prompt, 0, seqlen - 2)  # at least one token left to score (as EvalConfig checks)
    ids = ids.reshape(-1)
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ConfigError(f"{name}: {ids.numel()} tokens is less than one window of seqlen={seqlen}; lower the seqlen")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = model_device(model)
    batches = [windows[s : s + batch_size].to(device) for s in range(0, n_windows, batch_size)]
    total_nll = 0.0
    first = max(prompt - 1, 0)  # the last prompt position predicts the first generated token
    scored = seqlen - 1 - first
    t0 = time.perf_counter()
    with calibration_forward_context(model), _dense_prompt(model, prompt):
        logits_of = _logits(model, batches)
        for k, batch in enumerate(batches):
            # next() after the last logits are gone: zip/enumerate would keep them alive during the
            # next forward (two vocabulary-wide logits tensors at once: +201 MB for SmolLM2 at 1024)
            logits = next(logits_of)
            nll = shifted_nll(logits, batch, first=first)
            del logits
            _check_window(nll, name, k * batch_size, batch.shape[0], seqlen, scored)
            total_nll += nll
            if progress is not None:
                progress(min((k + 1) * batch_size, n_windows), n_windows)
        logits_of.close()  # inside this context: a streamed generator's own context must exit first
    secs = time.perf_counter() - t0
    tokens = n_windows * scored
    mean_nll = total_nll / tokens
    ppl = math.exp(mean_nll)  # finite: every window was checked (_check_window)
    return PerplexityResult(name, ppl, mean_nll, seqlen, n_windows, tokens, secs, n_windows * seqlen / secs)


def _dense_prompt(model: nn.Module, prompt: int):
    """The model's activation thresholds leaving the first ``prompt`` positions dense (no thresholds: nothing)."""
    from ..models.activation import state_of

    state = state_of(model) if prompt > 0 else None
    return state.dense_prompt(prompt) if state is not None else nullcontext()


def eval_token_ids(tokenizer, dataset: str, seqlen: int, data_dir=None, split: str | None = None,
                   cache: dict | None = None) -> Tensor:
    """The tokenized evaluation text of ``dataset``.

    ``cache`` (a dict the caller owns, e.g. one per CLI run) keeps the ids per tokenizer and
    dataset, so evaluating the dense and the compressed model tokenizes the text once.
    """
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), dataset, split, str(data_dir))
    ds = get_dataset(dataset, data_dir)
    ids = cache.get(key) if cache is not None else None
    if ids is None:
        ids = torch.tensor(tokenize(tokenizer, ds.eval_text(split)), dtype=torch.long)
        if cache is not None:
            cache[key] = ids
    limit = ds.eval_token_limit(seqlen)
    return ids[:limit] if limit else ids


def perplexity(
    model: nn.Module,
    tokenizer,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    data_dir=None,
    progress: Callable[[int, int], None] | None = None,
    token_cache: dict | None = None,
    prompt: int = 0,
) -> PerplexityResult:
    """Perplexity of ``model`` on a registered dataset's evaluation split (or a text file).

    A model streamed from disk (:class:`~prunekit.formats.lazy.LazyModel`) is evaluated one block at
    a time, with the same numbers. ``prompt``: score only the tokens after each window's first
    ``prompt`` (prefilled densely under activation thresholds; see :func:`perplexity_of_ids`).
    """
    ids = eval_token_ids(tokenizer, dataset, seqlen, data_dir, cache=token_cache)
    res = perplexity_of_ids(model, ids, seqlen, max_windows, batch_size, progress, name=dataset, prompt=prompt)
    log.info("%s: ppl %.4f (seqlen %d, %d windows, %d tokens, %.0f tok/s)", dataset, res.ppl, seqlen,
             res.windows, res.tokens, res.tokens_per_s)
    return res
