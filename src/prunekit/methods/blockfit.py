"""Fit a compressed block's remaining weights to targets by gradient descent, the sparsity held exactly.

The block-output half of block reconstruction (Zimmer, Roux, Wagner, Pokutta, "A free lunch in
LLM compression: revisiting retraining after pruning", 2025, arXiv:2510.14444; reference code
ZIB-IOL/Free-Lunch-in-LLM-Compression ``reconstruct_weights``): AdamW without weight decay, a
linear learning-rate warm-up over the first 10 % of the steps then a linear decay to zero (the
``transformers`` linear schedule), mean-squared error between the block's outputs and the targets,
a few passes over the calibration batches in their order (no shuffling), mixed precision. The
pruned weights stay exactly zero: their gradients are zeroed before every step (Adam's moments
stay zero, so its update is zero too) and they are re-zeroed after it, as ``+0.0``.

A fit can also be measured on sequences it never saw (``holdout``: the last ones of the calibration
set, kept out of training): their MSE before and after the fit is reported, and a fit that raised it
is undone (the block keeps its weights from before the fit) — with few calibration sequences a fit
can lower the training loss and still hurt the model (Qwen2.5-Coder-1.5B, 16 sequences: see
docs/one_shot.md).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import fast_amp
from .maskfit import LearnedMasks, MaskRule


@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit_block` trains (defaults: the free-lunch reference's, learning rate ours)."""

    epochs: int = 3
    lr: float = 1e-5
    micro_batch: int = 2
    warmup: float = 0.1
    amp: str = "auto"  # auto (the device's fast one: fast_amp) | none | bf16 | fp16
    holdout: int = 0  # the last sequences of the calibration set, measured and never trained on
    mask_every: int = 1  # with rules (moving masks, maskfit): steps between mask re-selections
    mask_decay: float = 0.0  # SR-STE's pull of the pruned shadow entries towards zero


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """The ``transformers`` linear schedule's factor at ``step`` (0 at step 0 when there is a warm-up)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


@contextlib.contextmanager
def trainable(params: Sequence[nn.Parameter]) -> Iterator[list[tuple[nn.Parameter, torch.dtype, bool]]]:
    """Parameters set to require gradients and held in float32 for the fit; dtype and flag restored after."""
    saved = [(p, p.dtype, p.requires_grad) for p in params]
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield saved
    finally:
        for p, dtype, flag in saved:
            p.grad = None
            p.requires_grad_(flag)
            if p.dtype != dtype:
                p.data = p.data.to(dtype)


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _micro_slices(start: int, stop: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, stop)) for s in range(start, stop, size)]


def split_holdout(sizes: Sequence[int], holdout: int, size: int) -> tuple[list[list[slice]], list[list[slice]]]:
    """Per batch, the micro-batch slices trained on and those held out (the last ``holdout`` sequences of the
    calibration set, counted across batches from the end)."""
    total = sum(sizes)
    if holdout >= total:
        raise ValueError(f"holdout={holdout} leaves none of the {total} calibration sequences to fit on; "
                         f"use a holdout below {total} (or more calibration samples)")
    train, held, left = [], [], holdout
    for n in reversed(sizes):
        h = min(n, left)
        left -= h
        train.append(_micro_slices(0, n - h, size))
        held.append(_micro_slices(n - h, n, size))
    return train[::-1], held[::-1]


def _pairs(slices: list[list[slice]]) -> list[tuple[int, slice]]:
    return [(b, rows) for b in range(len(slices)) for rows in slices[b]]


@torch.no_grad()
def _mse(run, inputs, targets, pairs: list[tuple[int, slice]], device: torch.device, amp: str) -> float:
    """Mean squared error of the block over ``pairs`` (each sequence weighted alike)."""
    total, count, last = 0.0, 0, None
    for b, rows in pairs:
        if b != last:
            x, y, last = inputs[b], targets[b], b
        with _autocast(device, amp):
            out = run(b, x, rows)
        n = rows.stop - rows.start
        total += float(F.mse_loss(out.float(), y[rows].float())) * n
        count += n
    return total / max(count, 1)


def fit_block(run: Callable[[int, Tensor, slice | None], Tensor], inputs: Sequence[Tensor], targets: Sequence[Tensor],
              params: Sequence[nn.Parameter], zeros: dict[nn.Parameter, Tensor], held: dict[nn.Parameter, Tensor],
              settings: FitSettings, rules: dict[nn.Parameter, MaskRule] | None = None) -> dict:
    """Train ``params`` so that ``run(b, inputs[b], rows)`` matches ``targets[b][rows]`` for every batch.

    Args:
        run: the block on batch ``b`` (a :class:`~prunekit.methods.blockstep.BlockData` runner).
        inputs, targets: per calibration batch, ``[n, seqlen, width]`` each.
        params: what is trained.
        zeros: for some of ``params`` (pruned weights), a boolean mask of the entries held at exactly zero.
        held: for some of ``params``, a boolean mask of the entries held at their value (the bias of a
            row whose weights are all pruned).
        settings: epochs, learning rate, micro-batch size, warm-up share, mixed precision, held-out sequences,
            mask re-selection.
        rules: the weights (keys of ``zeros``) whose masks move during the fit
            and how each is chosen again (:mod:`~prunekit.methods.maskfit`); their ``zeros`` are then only
            the starting masks.

    Returns:
        ``{"steps", "amp", "loss_first_epoch", "loss_last_epoch", "finite"}`` (mean MSE over the steps of each
        epoch); with moving masks ``"mask_changed"`` (share of the kept weights the one-shot mask had pruned);
        with a holdout also ``"heldout_before"``, ``"heldout_after"`` (MSE on the held-out sequences)
        and ``"reverted"`` (the fit raised it and was undone).
    """
    sizes = [inputs[b].shape[0] for b in range(len(inputs))]
    train, out_of_fit = split_holdout(sizes, settings.holdout, settings.micro_batch)
    pairs, measured = _pairs(train), _pairs(out_of_fit)
    total = settings.epochs * len(pairs)
    if total == 0 or not params:
        return {"steps": 0}
    device = params[0].device
    amp = fast_amp(device) if settings.amp == "auto" else settings.amp
    with trainable(params):
        info: dict = {}
        if measured:
            before = [p.detach().clone() for p in params]
            info["heldout_before"] = _mse(run, inputs, targets, measured, device, amp)
        learner = LearnedMasks(rules, settings.mask_every, settings.mask_decay) if rules else None
        if learner is not None:
            zeros = {p: m for p, m in zeros.items() if p not in rules}
        losses = _train(run, inputs, targets, pairs, params, zeros, held, settings, amp, learner)
        if learner is not None:
            info["mask_changed"] = learner.changed()
        if measured:
            info["heldout_after"] = _mse(run, inputs, targets, measured, device, amp)
            info["reverted"] = not info["heldout_after"] <= info["heldout_before"]  # a NaN after reverts too
            if info["reverted"]:
                with torch.no_grad():
                    for p, v in zip(params, before):
                        p.copy_(v)
                if learner is not None:
                    info["mask_changed"] = 0.0
    n = len(pairs)
    first, last = losses[:n], losses[-n:]
    return {"steps": total, "amp": amp, "loss_first_epoch": sum(first) / n, "loss_last_epoch": sum(last) / n,
            "finite": all(math.isfinite(v) for v in losses), **info}


def _train(run, inputs, targets, pairs, params, zeros, held, settings: FitSettings, amp: str,
           learner: LearnedMasks | None = None) -> list[float]:
    """The AdamW passes of :func:`fit_block`; the loss of every step. ``learner``: moving masks (straight-through)."""
    total = settings.epochs * len(pairs)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_schedule(s, total, int(settings.warmup * total)))
    device = params[0].device
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None  # fp16 gradients underflow
    losses: list[float] = []
    for _epoch in range(settings.epochs):
        last = None
        for b, rows in pairs:
            if b != last:  # read each batch once per pass (it may live on disk)
                x, y, last = inputs[b], targets[b], b
            with _autocast(device, amp):
                out = run(b, x, rows)
            loss = F.mse_loss(out.float(), y[rows].float())
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(opt)
            for fixed in (zeros, held):
                for p, m in fixed.items():
                    if p.grad is not None:
                        p.grad.masked_fill_(m, 0.0)
            if learner is not None:
                learner.load_shadows()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, m in zeros.items():
                    p.data.masked_fill_(m, 0.0)
            if learner is not None:
                learner.reselect()
            losses.append(float(loss.detach()))
    return losses
