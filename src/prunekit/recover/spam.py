"""SPAM: spike-aware Adam with momentum reset (Huang et al., ICLR 2025, arXiv:2501.06842).

Adam with two additions, following the authors' reference optimizer (their ``SPAM.py``, dense
momentum, ``density = 1``):

1. **Momentum reset.** At every global step ``t`` (1-based) with ``t % DeltaT == 0`` the first and
   second moments are set to zero, and the step size is multiplied by a cosine warm-up factor for
   the next ``N`` steps: ``phi(k) = 1 - 0.99 * (1 + cos(pi * k / (N + 1))) / 2`` for ``k = t - t_reset
   < N``, else 1 (before the first reset ``phi = 1``). Bias correction keeps counting from the
   start, as in the reference code; the warm-up stands in for it after a reset.
2. **Spike-aware clipping.** Where ``g^2 > theta * v`` (``v`` the second moment before this
   step's update) the gradient becomes ``sign(g) * sqrt(theta * v)``. Clipping starts once
   ``(t % DeltaT if DeltaT else t) >= clip_delay`` (``v`` is meaningless right after a reset).

Then, with ``g`` the clipped gradient (the reference's HF-style Adam; ``eps`` outside the bias
correction)::

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p -= lr * phi * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
    p -= lr * weight_decay * p          (decoupled)

A gradient that is zero at a pruned position leaves ``m = v = 0`` and the update zero there:
clipping cannot fire (``0 > theta * 0`` is false).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor


def warmup_factor(k: int, n: int) -> float:
    """SPAM's cosine warm-up multiplier ``k`` steps after a momentum reset (``n`` warm-up steps)."""
    if k >= n:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * k / (n + 1))) / 2.0


def clip_spikes(grad: Tensor, exp_avg_sq: Tensor, threshold: float) -> Tensor:
    """``g`` with every ``g^2 > theta * v`` replaced by ``sign(g) * sqrt(theta * v)`` (a new tensor)."""
    bound = (exp_avg_sq * threshold).sqrt()
    spike = grad.square() > exp_avg_sq * threshold
    return torch.where(spike, grad.sign() * bound, grad)


class SPAM(torch.optim.Optimizer):
    """Spike-aware Adam with momentum reset (see the module docstring for the exact rule).

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as AdamW.
        threshold: spike threshold theta (the paper's 5000; 0 disables clipping).
        reset_interval: momentum-reset interval DeltaT in steps (0: never reset).
        warmup_steps: cosine warm-up steps N after each reset.
        clip_delay: steps after a reset (and from the start) before clipping applies.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, threshold: float = 5000.0, reset_interval: int = 500,
                 warmup_steps: int = 150, clip_delay: int = 20) -> None:
        if lr <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps <= 0 or threshold < 0:
            raise ValueError(f"invalid SPAM settings lr={lr} betas={betas} eps={eps} threshold={threshold}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        # global counters live in every group so that state_dict()/load_state_dict() carry them
        for g in self.param_groups:
            g.setdefault("spam_step", 0)
            g.setdefault("spam_reset_at", -1)
        self.threshold, self.reset_interval = float(threshold), int(reset_interval)
        self.warmup_steps, self.clip_delay = int(warmup_steps), int(clip_delay)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            t = group["spam_step"] + 1
            group["spam_step"] = t
            reset = self.reset_interval > 0 and t % self.reset_interval == 0
            if reset:
                group["spam_reset_at"] = t
            k = t - group["spam_reset_at"]
            phi = warmup_factor(k, self.warmup_steps) if group["spam_reset_at"] >= 0 else 1.0
            since = t % self.reset_interval if self.reset_interval > 0 else t
            clip = self.threshold > 0 and since >= self.clip_delay
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._update(p, group, t, reset, phi, clip, beta1, beta2)
        return loss

    def _update(self, p: Tensor, group: dict, t: int, reset: bool, phi: float, clip: bool, beta1: float,
                beta2: float) -> None:
        state = self.state[p]
        if not state or reset:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g = clip_spikes(p.grad, v, self.threshold) if clip else p.grad
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size * phi)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
