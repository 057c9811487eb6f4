"""The one context every calibration forward runs in, and the capture of every block's inputs.

Every decoder block gets exactly what the model itself passes to it. Models that mix sliding-window
and full attention, or keep a rotary table per layer type (Gemma 2/3 and others), pass each block
its own mask and position embeddings, so replaying block 0's keyword arguments to every block (the
reference implementations' ``Catcher``) computes later blocks on activations the model never
produces. :func:`capture_block_inputs` records the arguments of *every* block instead, at the
cost of one embedding pass: for the duration of one forward per calibration batch each block's
``forward`` is replaced by a stub that records its arguments and hands its input on unchanged,
and the forward stops at the last block (the LM head never runs). The arguments a block receives
do not depend on the previous block's output (the model computes masks and rotary tables before
its layer loop), which the replay tests check against ``output_hidden_states`` on every
architecture the test suite covers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..models import model_device


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


@dataclass
class BlockCall:
    """Everything the model passed to one block in one forward, except the hidden state."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_kw: bool = False  # the model passes hidden_states as a keyword

    @classmethod
    def split(cls, args: tuple, kwargs: dict) -> tuple[Tensor, "BlockCall"]:
        """``(hidden_states, the rest)`` of a block call."""
        if args:
            return args[0], cls(tuple(args[1:]), dict(kwargs))
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], cls((), rest, True)

    def __call__(self, block: nn.Module, hidden: Tensor) -> Tensor:
        """Run ``block`` on ``hidden`` with these arguments; returns its output hidden states."""
        if self.hidden_kw:
            out = block(*self.args, **{**self.kwargs, "hidden_states": hidden})
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    """The calibration inputs of the block being processed, and every block's other arguments.

    ``hidden[b]`` is batch ``b``'s input to the current block (replaced by the block's output as
    the engine moves on); ``calls[i][b]`` is what the model passed to block ``i`` with batch ``b``.
    Blocks of the same layer type share the same tensors, so this costs no more memory than
    block 0's arguments alone.
    """

    hidden: list[Tensor] = field(default_factory=list)
    calls: list[list[BlockCall]] = field(default_factory=list)
    returns: Any = None  # what block 0 returned once (its form: a tensor, or a tuple led by the hidden states)

    def call(self, index: int, block: nn.Module, b: int, hidden: Tensor | None = None) -> Tensor:
        """Block ``index`` (``block``) on batch ``b`` (its stored input unless ``hidden`` is given)."""
        return self.calls[index][b](block, self.hidden[b] if hidden is None else hidden)

    @property
    def batches(self) -> int:
        return len(self.hidden)


class _Captured(Exception):
    """Raised by the last block's stub: every block's arguments of this batch are recorded."""


def _like(template: Any, hidden: Tensor) -> Any:
    """``hidden`` in the structure a block returns (a tensor, or a tuple led by the hidden states)."""
    if isinstance(template, (tuple, list)):
        return (hidden, *template[1:])
    return hidden


@contextlib.contextmanager
def _recording(blocks: nn.ModuleList, rec: BlockInputs) -> Iterator[None]:
    """Replace every block's ``forward`` by a recorder for the duration of the context."""
    saved = [b.__dict__.get("forward") for b in blocks]  # an instance-level forward (e.g. accelerate's hook)

    def recorder(i: int, block: nn.Module):
        real = saved[i] or type(block).forward.__get__(block)

        def forward(*args, **kwargs):
            hidden, call = BlockCall.split(args, kwargs)
            rec.calls[i].append(call)
            if i == 0:
                rec.hidden.append(hidden)
            if i == len(blocks) - 1:
                raise _Captured
            if rec.returns is None:  # learn once what a block returns, from one real call of block 0
                rec.returns = real(*args, **kwargs)
            return _like(rec.returns, hidden)

        return forward

    with _stubbed(blocks, [recorder(i, b) for i, b in enumerate(blocks)]):
        yield


@contextlib.contextmanager
def _stubbed(blocks: nn.ModuleList, forwards: list) -> Iterator[None]:
    """Every block's ``forward`` replaced by ``forwards[i]`` inside the context, restored after."""
    saved = [b.__dict__.get("forward") for b in blocks]
    for b, f in zip(blocks, forwards):
        b.forward = f
    try:
        yield
    finally:
        for b, f in zip(blocks, saved):
            if f is None:
                del b.forward
            else:
                b.forward = f


def logits_from_last_hidden(model: nn.Module, blocks: nn.ModuleList, batch: dict[str, Tensor], last: Tensor,
                            returns: Any, zero_embeddings: bool = False) -> Tensor:
    """The model's logits for ``ids`` when its last block outputs ``last``: the model's own head
    (final norm, LM head, any logit soft-capping) runs on it, every block is skipped.

    ``returns`` is a block's output form (:attr:`BlockInputs.returns`). ``zero_embeddings``: pass
    zeros as ``inputs_embeds`` instead of the ids (the embeddings' output is never used: every
    block is skipped), so the embedding matrix need not be in memory.
    """
    if zero_embeddings:
        ids = batch["input_ids"]
        batch = {k: v for k, v in batch.items() if k != "input_ids"}
        batch["inputs_embeds"] = torch.zeros(*ids.shape, last.shape[-1], dtype=last.dtype, device=last.device)
    passthrough = [lambda *a, **k: _like(returns, BlockCall.split(a, k)[0]) for _ in blocks[:-1]]
    with _stubbed(blocks, passthrough + [lambda *a, **k: _like(returns, last)]):
        return model(**batch, use_cache=False).logits


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, batch_size: int,
                         device: torch.device, store: Any = None) -> BlockInputs:
    """Record block 0's hidden states and every block's other arguments for ``ids`` in batches.

    One forward per batch runs the model's embedding stage (embeddings, masks, rotary tables)
    but no block and no LM head; the first batch also runs block 0 once to learn its output form.
    """
    batches = [{"input_ids": ids[s : s + batch_size].to(device)} for s in range(0, ids.shape[0], batch_size)]
    return capture_batches(model, blocks, batches, store)


def capture_batches(model: nn.Module, blocks: nn.ModuleList, batches: list[dict[str, Tensor]],
                    store: Any = None) -> BlockInputs:
    """:func:`capture_block_inputs` for batches of model inputs (``input_ids`` with, e.g., an
    ``attention_mask`` for padded sequences: the masks the model builds from it are recorded too).

    ``store``: where the hidden states go (an empty list-like, e.g. a
    :class:`~prunekit.calibration.spill.SpilledTensors` on disk); a list in memory by default."""
    rec = BlockInputs(hidden=[] if store is None else store, calls=[[] for _ in blocks])
    with _recording(blocks, rec):
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Captured:
                pass
    if len(rec.hidden) != len(rec.calls[-1]):
        raise RuntimeError(f"{type(model).__name__}: the forward did not reach the last decoder block; "
                           "prunekit cannot calibrate this architecture — please open an issue")
    return rec


class StopForward(Exception):
    """Raised by a hook to end a calibration forward early: nothing after that point is needed."""


def _raise_stop(*_args) -> None:
    raise StopForward


def hooked_pass(model: nn.Module, ids: Tensor, batch_size: int, stop_after: nn.Module | None = None,
                before_batch=None) -> None:
    """Run ``model`` on ``ids`` in batches for what its hooks record (statistics passes on the dense
    model); each forward ends once ``stop_after`` has run (or a hook raises :class:`StopForward`),
    so the layers after it — and the LM head — never run. ``before_batch()`` is called before each batch."""
    dev = model_device(model)
    handle = stop_after.register_forward_hook(_raise_stop) if stop_after is not None else None
    try:
        with calibration_forward_context(model):
            for s in range(0, ids.shape[0], batch_size):
                if before_batch is not None:
                    before_batch()
                try:
                    model(input_ids=ids[s : s + batch_size].to(dev), use_cache=False)
                except StopForward:
                    pass
    finally:
        if handle is not None:
            handle.remove()
