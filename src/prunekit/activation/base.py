"""The interface of an activation method: how it picks sites and turns calibration samples into thresholds.

The thresholds themselves — sites, masks, the state installed on a model — are the model-side half
and live in :mod:`prunekit.models.activation` (the format that installs saved thresholds needs no
calibration code); the names that moved are still handed out here, with a :class:`DeprecationWarning`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._deprecated import moved
from ..models.activation import GATE, INPUT, Site  # noqa: F401  (the methods' vocabulary)
from ..registry import ACTIVATION_METHODS  # noqa: F401  (re-exported: the methods register through it)


class ActivationMethod(ABC):
    """How one method picks its sites and turns calibration samples into thresholds.

    The calibration loop (:mod:`.calibrate`) runs block by block: it asks the method for the
    block's sites, samples ``|activation|`` at each (token rows; every site whose input tensor is
    shared — q/k/v, gate/up — is sampled once), asks for the thresholds, installs them and
    re-runs the block so the next one sees sparsified activations.
    """

    name: ClassVar[str]
    supports_greedy: ClassVar[bool] = False
    #: also record the mean |up_proj output| per channel of every gated MLP (CHESS's importance)
    needs_up_mean: ClassVar[bool] = False

    @abstractmethod
    def sites(self, block: nn.Module, prefix: str) -> list[Site]:
        """The sites of one decoder block (qualified names start with ``prefix``)."""

    def channel_scale(self, name: str) -> Tensor | None:
        """Per-channel weights of ``|x|`` at an ``input`` site before its quantile (WINA), or ``None`` (``|x|``).

        With a scale ``c`` the site's threshold is per channel, ``T / c``, ``T`` a quantile of ``|x| * c``
        (the greedy allocation searches on those scores too).
        """
        return None

    @abstractmethod
    def thresholds(self, sites: list[Site], samples: dict[str, Tensor], sparsity: float,
                   up_mean: dict[str, Tensor]) -> dict[str, Tensor]:
        """Float32 thresholds per site from ``samples`` (``[tokens, width]`` of ``|x|`` per site)."""


def quantile_threshold(values: Tensor, sparsity: float) -> Tensor:
    """The threshold ``t`` with a ``sparsity`` fraction of ``values`` at or below it (float32 scalar).

    ``t`` is the k-th smallest value, k = round(sparsity * n): exactly k entries of ``values`` satisfy
    ``v <= t`` when they are distinct (ties at ``t`` are zeroed too). Sparsity 0 gives ``t = -1``:
    nothing is zeroed, not even exact zeros.
    """
    flat = values.reshape(-1).float()
    k = int(round(sparsity * flat.numel()))
    if k <= 0:
        return torch.tensor(-1.0)
    return torch.kthvalue(flat, min(k, flat.numel())).values.clone()



def per_channel(big: Tensor, scale: Tensor) -> Tensor:
    """A threshold ``big`` on ``|x| * scale`` as one threshold per channel on ``|x|``: ``big / scale``.

    ``big < 0`` (sparsity 0) keeps everything (``-1``); a channel of scale 0 contributes nothing (``inf``).
    """
    m = scale.float()
    if float(big) < 0:
        return torch.full_like(m, -1.0)
    return torch.where(m > 0, big / m.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(m, float("inf")))


def scaled_threshold(values: Tensor, scale: Tensor, sparsity: float) -> Tensor:
    """Per-channel thresholds on ``values`` (``[tokens, width]``) at the ``sparsity``-quantile of ``values * scale``."""
    return per_channel(quantile_threshold(values.float() * scale.float(), sparsity), scale)

_MOVED = ("ActivationState", "Counter", "GateMask", "InputMask", "apply_threshold", "gated_mlp", "keep_mask", "state_of")


def __getattr__(name: str):
    """The thresholds on a model moved to :mod:`prunekit.models.activation` (deprecated here)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..models import activation

    return moved(__name__, name, activation)
