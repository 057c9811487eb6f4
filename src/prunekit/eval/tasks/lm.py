"""Batched model calls for tasks: choice log-likelihoods with prefix reuse, greedy generation.

Log-likelihoods (multiple choice): the context of a request is encoded ONCE for all of its
choices. The contexts of a batch are left-padded and run with ``use_cache=True``; the logits
at the last context position already give every choice's first token, so single-token
choices (MMLU's " A", BoolQ's " yes") cost no second pass at all. Longer choices reuse the
context's key/value cache (repeated per choice) and run only their own tokens.

Greedy generation: prompts are left-padded in batches, prefilled once and decoded token by
token with the KV cache; a row stops at EOS or a stop string, the batch when all rows have.

Tokenization follows lm-evaluation-harness: a context's trailing spaces move to the
continuation, and the continuation's tokens are those of ``encode(context + continuation)``
after the context's tokens (so BPE merges across the boundary are the model's own).
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...calibration import calibration_forward_context
from ...models import context_length, model_device
from ...errors import ConfigError

log = logging.getLogger(__name__)

#: key/value rows (choices) per continuation forward, and generation prompts per batch
DEFAULT_BATCH = 16


@dataclass
class Counter:
    """Tokens through the model (for throughput)."""

    tokens: int = 0
    forwards: int = 0


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _start_token(tokenizer) -> int:
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise ConfigError("the tokenizer has no BOS/EOS/PAD token to stand in for an empty context")


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def split_request(tokenizer, context: str, continuation: str, memo: dict | None = None) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` the way lm-evaluation-harness tokenizes them.

    ``memo`` (a dict reused across the choices of one context) saves re-encoding the context.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    memo = {} if memo is None else memo
    if context not in memo:
        memo[context] = encode(tokenizer, context)
    ctx = memo[context]
    if not ctx:
        return [_start_token(tokenizer)], encode(tokenizer, continuation)
    whole = encode(tokenizer, context + continuation)
    cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else encode(tokenizer, continuation)
    return list(ctx), cont


def max_length(model: nn.Module, cap: int = 2048) -> int:
    limit = context_length(model)
    return min(limit, cap) if limit else cap


def _accepts_position_ids(model: nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def _cache_arg(model: nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by: ``cache`` (transformers >= 5.2x), else
    ``past_key_values`` (deprecated there: passing it prints a FutureWarning)."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return "past_key_values"


def cache_of(output):
    """The KV cache a forward returned, under either name."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


def _forward(model, ids: Tensor, mask: Tensor, pos: Tensor | None, past=None):
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=True)
    if pos is not None:
        kw["position_ids"] = pos
    if past is not None:
        kw[_cache_arg(model)] = past
    return model(**kw)


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[tuple[str, Sequence[str]]],
    batch_size: int = DEFAULT_BATCH,
    max_len: int | None = None,
    counter: Counter | None = None,
    progress: Callable[[int, int], None] | None = None,
    reuse_prefix: bool = True,
) -> list[list[float]]:
    """Total log-likelihood of each continuation given its context.

    Args:
        requests: ``(context, [continuation, ...])`` pairs; continuations usually start with
            a space (``" yes"``).
        batch_size: contexts per forward; also continuation rows per second-pass forward.
        max_len: longest sequence fed to the model (default: the model's context, at most 2048);
            longer contexts lose their left part, as in the harness.
        reuse_prefix: ``False`` scores every ``context + continuation`` as its own sequence
            (the reference path the tests compare against).

    Returns:
        ``lls[i][j]`` = ``sum_t log p(cont_j[t] | ctx_i, cont_j[:t])`` in nats (float32 maths).
    """
    max_len = max_len or max_length(model)
    counter = counter if counter is not None else Counter()
    dev = model_device(model)
    use_pos = _accepts_position_ids(model)
    pad = _pad_id(tokenizer)
    prepared = []  # (ctx_ids, [cont_ids])
    for context, conts in requests:
        memo: dict = {}
        cont_ids = []
        if not conts:
            raise ConfigError(f"context {context[-40:]!r} has no choices")
        for c in conts:
            ctx_ids, ids = split_request(tokenizer, context, c, memo)
            if not ids:
                raise ConfigError(f"continuation {c!r} of context {context[-40:]!r} encodes to no tokens")
            cont_ids.append(ids)
        longest = max(len(ids) for ids in cont_ids)
        if longest > max_len - 1:
            raise ConfigError(f"a choice of {longest} tokens does not fit max length {max_len}")
        keep = max(1, max_len - (longest - 1))
        prepared.append((ctx_ids[-keep:], cont_ids))
    out: list[list[float]] = [[] for _ in prepared]
    # longest first: similar lengths share a batch (less padding), deterministic order
    order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i][0]) - max(map(len, prepared[i][1])), i))
    done = 0
    with calibration_forward_context(model):
        if not reuse_prefix or getattr(model, "prunekit_lazy", None) is not None:
            _score_full(model, prepared, order, out, batch_size, dev, pad, use_pos, counter)
        else:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                _score_batch(model, [prepared[i] for i in idx], [out[i] for i in idx], batch_size, dev, pad,
                             use_pos, counter)
                done += len(idx)
                if progress is not None:
                    progress(done, len(order))
    return out


def _score_batch(model, batch, outs, row_batch, dev, pad, use_pos, counter) -> None:
    lens = [len(ctx) for ctx, _ in batch]
    width = max(lens)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ctx, _) in enumerate(batch):
        ids[r, width - len(ctx):] = torch.tensor(ctx)
        mask[r, width - len(ctx):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0) if use_pos else None
    res = _forward(model, ids.to(dev), mask.to(dev), None if pos is None else pos.to(dev))
    counter.tokens += sum(lens)
    counter.forwards += 1
    last = F.log_softmax(res.logits[:, -1].float(), dim=-1).cpu()
    cache = cache_of(res)
    rows = []  # (batch row, choice index, continuation ids) needing a second pass
    for r, (_, conts) in enumerate(batch):
        for j, cont in enumerate(conts):
            outs[r].append(float(last[r, cont[0]]))
            if len(cont) > 1:
                rows.append((r, j, cont))
    del res
    for start in range(0, len(rows), row_batch):
        chunk = rows[start : start + row_batch]
        t = max(len(c) - 1 for _, _, c in chunk)
        cids = torch.full((len(chunk), t), pad, dtype=torch.long)
        cmask = torch.zeros((len(chunk), t), dtype=torch.long)
        for k, (_, _, c) in enumerate(chunk):
            cids[k, : len(c) - 1] = torch.tensor(c[:-1])
            cmask[k, : len(c) - 1] = 1
        sel = torch.tensor([r for r, _, _ in chunk])
        past = copy.deepcopy(cache)
        past.reorder_cache(sel.to(dev))  # repeat each context's keys/values once per choice row
        full_mask = torch.cat([mask[sel], cmask], dim=1)
        cpos = (torch.tensor([lens[r] for r, _, _ in chunk])[:, None] + torch.arange(t)[None]) if use_pos else None
        logits = _forward(model, cids.to(dev), full_mask.to(dev), None if cpos is None else cpos.to(dev), past).logits
        counter.tokens += int(cmask.sum())
        counter.forwards += 1
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        for k, (r, j, c) in enumerate(chunk):
            tgt = torch.tensor(c[1:])
            outs[r][j] += float(logp[k, torch.arange(len(c) - 1), tgt].sum())
        del past, logits, logp


def _full_batches(prepared, order, batch_size, pad, use_pos):
    """Every context+continuation as its own right-padded sequence, in batches: ``(rows, model inputs)``."""
    seqs = [(i, ctx, cont) for i in order for ctx, conts in [prepared[i]] for cont in conts]
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(c) + len(k) for _, c, k in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, c, k) in enumerate(chunk):
            ids[r, : len(c) + len(k)] = torch.tensor(c + k)
            mask[r, : len(c) + len(k)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if use_pos:
            inputs["position_ids"] = torch.arange(width)[None].expand(len(chunk), -1)
        yield chunk, inputs


def _add_scores(chunk, logits, out) -> None:
    logp = F.log_softmax(logits.float(), dim=-1).cpu()
    for r, (i, c, k) in enumerate(chunk):
        p = torch.arange(len(c) - 1, len(c) + len(k) - 1)
        out[i].append(float(logp[r, p, torch.tensor(k)].sum()))


def _score_full(model, prepared, order, out, batch_size, dev, pad, use_pos, counter) -> None:
    """Reference path: every context+continuation scored as its own right-padded sequence.

    A model streamed from disk (:class:`~prunekit.formats.lazy.LazyModel`) is scored this way, all
    sequences through one block at a time (no prefix reuse: that needs every block per step).
    """
    batches = list(_full_batches(prepared, order, batch_size, pad, use_pos))
    lazy = getattr(model, "prunekit_lazy", None)
    if lazy is not None:
        from ..streamed import streamed_logits

        logits_of = streamed_logits(lazy, [inputs for _, inputs in batches])
    else:
        logits_of = (_forward(model, x["input_ids"].to(dev), x["attention_mask"].to(dev),
                              x["position_ids"].to(dev) if "position_ids" in x else None).logits for _, x in batches)
    for chunk, inputs in batches:
        logits = next(logits_of)  # not zip(): it would hold the previous logits through the next forward
        counter.tokens += int(inputs["attention_mask"].sum())
        counter.forwards += 1
        _add_scores(chunk, logits, out)
        del logits
    logits_of.close()  # a streamed generator's forward context exits now, not when it is collected


def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH,
    max_len: int | None = None,
    counter: Counter | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (KV cache, left-padded batches), cut at the first stop string.

    A prompt longer than ``max_len - max_new_tokens`` tokens loses its left part.
    """
    if getattr(model, "prunekit_lazy", None) is not None:
        raise ConfigError("greedy generation needs every block for every new token: it cannot stream a model one "
                          "block at a time; score generation tasks where the model fits in memory")
    max_len = max_len or max_length(model)
    if max_new_tokens < 1 or max_new_tokens >= max_len:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be in [1, {max_len - 1}]")
    counter = counter if counter is not None else Counter()
    dev = model_device(model)
    use_pos = _accepts_position_ids(model)
    pad = _pad_id(tokenizer)
    eos = {t for t in (tokenizer.eos_token_id,) if t is not None}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    encoded = [(encode(tokenizer, p) or [_start_token(tokenizer)])[-(max_len - max_new_tokens):] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), i))
    out = [""] * len(prompts)
    with calibration_forward_context(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            texts = _generate_batch(model, tokenizer, [encoded[i] for i in idx], max_new_tokens, stop, eos, dev,
                                    pad, use_pos, counter)
            for i, t in zip(idx, texts):
                out[i] = t
            if progress is not None:
                progress(start + len(idx), len(order))
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((k for k in (text.find(s) for s in stop if s) if k >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _generate_batch(model, tokenizer, prompts, max_new, stop, eos, dev, pad, use_pos, counter) -> list[str]:
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    res = _forward(model, ids.to(dev), mask.to(dev), pos.to(dev) if use_pos else None)
    counter.tokens += sum(len(p) for p in prompts)
    counter.forwards += 1
    generated: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    texts = [""] * n
    next_pos = pos[:, -1] + 1
    for step in range(max_new):
        nxt = res.logits[:, -1].float().argmax(-1).cpu()
        for r in range(n):
            if finished[r]:
                continue
            tok = int(nxt[r])
            if tok in eos:
                finished[r] = True
                continue
            generated[r].append(tok)
            texts[r], hit = cut_at_stop(tokenizer.decode(generated[r], skip_special_tokens=True), stop)
            finished[r] = hit
        if all(finished) or step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)
        res = _forward(model, nxt[:, None].to(dev), mask.to(dev), next_pos[:, None].to(dev) if use_pos else None,
                       cache_of(res))
        counter.tokens += sum(1 for f in finished if not f)
        counter.forwards += 1
        next_pos = next_pos + 1
    return texts
