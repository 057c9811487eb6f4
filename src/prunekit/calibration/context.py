"""The one context every calibration forward runs in, and block-0 input capture."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn


@contextlib.contextmanager
def calibration_forward_context(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd, no KV cache; everything restored on exit (also on errors)."""
    was_training = model.training
    cfg = getattr(model, "config", None)
    had_cache = hasattr(cfg, "use_cache")
    old_cache = getattr(cfg, "use_cache", None)
    model.eval()
    if had_cache:
        cfg.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        if had_cache:
            cfg.use_cache = old_cache
        model.train(was_training)


class _Captured(Exception):
    """Raised inside block 0's pre-hook to stop the forward once its inputs are recorded."""


@dataclass
class BlockInputs:
    """Inputs of one decoder block for every calibration batch.

    ``hidden[b]`` is batch ``b``'s hidden state; ``args[b]`` / ``kwargs[b]`` are everything else
    the model passed to the block (attention mask, position ids, rotary embeddings, …), kept
    as they were because architectures differ in what they pass.
    """

    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple[Any, ...]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    hidden_kw: bool = False  # the model passes hidden_states as a keyword

    def call(self, block: nn.Module, b: int, hidden: Tensor | None = None) -> Tensor:
        h = self.hidden[b] if hidden is None else hidden
        if self.hidden_kw:
            out = block(*self.args[b], **{**self.kwargs[b], "hidden_states": h})
        else:
            out = block(h, *self.args[b], **self.kwargs[b])
        return out[0] if isinstance(out, (tuple, list)) else out


def capture_block_inputs(model: nn.Module, block0: nn.Module, ids: Tensor, batch_size: int, device: torch.device) -> BlockInputs:
    """Run the model's embedding stage on ``ids`` in batches and record block 0's inputs."""
    rec = BlockInputs()

    def hook(_mod, args, kwargs):
        if args:
            rec.hidden.append(args[0])
            rec.args.append(tuple(args[1:]))
            rec.kwargs.append(dict(kwargs))
        else:
            rec.hidden_kw = True
            rec.hidden.append(kwargs["hidden_states"])
            rec.args.append(())
            rec.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Captured

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return rec
