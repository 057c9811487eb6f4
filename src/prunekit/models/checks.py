"""Sanity checks of a loaded model that must fail before any work is done."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


_CHUNK = 1 << 22  # elements per step: torch.isfinite makes float temporaries as large as its input


def all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` in bounded memory (chunks of 4M elements, not 2x the tensor)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(c).all()) for c in flat.split(_CHUNK))


def count_nonfinite(t: torch.Tensor) -> int:
    """How many values of ``t`` are NaN or infinite, in bounded memory."""
    return sum(int((~torch.isfinite(c)).sum()) for c in t.detach().reshape(-1).split(_CHUNK))


def check_finite(model: nn.Module) -> None:
    """Every floating-point parameter finite and every buffer free of NaN.

    Buffers may hold ``-inf`` on purpose (additive causal masks), so only NaN counts there. A NaN
    anywhere — a norm weight as much as a linear — makes every number the run produces
    meaningless, so it is an error, named with the tensor.

    Raises:
        ConfigError: naming the first bad tensor and how many values are bad.
    """
    for name, p in model.named_parameters():
        if p.is_floating_point() and not all_finite(p):
            bad = count_nonfinite(p)
            raise ConfigError(f"{name} has {bad} NaN/Inf values; the model is corrupt: reload or re-download it")
    for name, b in model.named_buffers():
        if b.is_floating_point() and bool(torch.isnan(b).any()):
            raise ConfigError(f"buffer {name} has {int(torch.isnan(b).sum())} NaN values; the model is corrupt: "
                              "reload or re-download it")
