"""The method interface the sequential engine drives, and the statistics methods share.

A method never sees a model: it gets one linear layer, the statistics it asked the engine to
gather from that layer's calibration inputs, and a :class:`Target`; it edits the layer in place
(masking) or returns a replacement module (low rank).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..masks import Pattern
from ..options import Options
from ..models import in_features, weight_view
from .blockstep import BlockData, BlockNeeds


@dataclass(frozen=True)
class Target:
    """What one linear must reach: a sparsity (or rank-reduction fraction) and a pattern."""

    sparsity: float
    pattern: Pattern = Pattern()

    def __post_init__(self) -> None:
        if not (0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"target sparsity {self.sparsity!r} must lie in [0, 1)")


@dataclass
class CompressResult:
    """What ``compress`` did: an optional replacement module and an error estimate.

    ``error`` is the method's own estimate of the relative output error of this layer on the
    calibration inputs, ``||(W - W')X||^2 / ||WX||^2`` (exact for SparseGPT's Hessian, the
    diagonal approximation for Wanda, ``None`` when the method has no data).
    """

    module: nn.Module | None = None
    error: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


class InputStats:
    """Running statistics of a linear layer's input features (float32, any device).

    The two statistics the reference implementations use are accumulated exactly as they do it,
    one calibration sequence at a time, so that prunekit reproduces them bit for bit whatever the
    calibration batch size (a batched block forward gives the same activations as per-sequence
    forwards; only the accumulation order could differ):

    * ``scaler``: wanda's ``WrappedGPT.scaler_row``, the running mean over sequences of
      ``||x_j||^2`` (sum over the sequence's tokens): ``s *= n/(n+1); s += ||x||^2/(n+1)``.
    * the Hessian: SparseGPT's ``add_batch``, ``H *= n/(n+1); x' = sqrt(2/(n+1)) x; H += x'^T x'``,
      i.e. ``H = 2 X^T X / n_sequences``.

    With ``moments``, per-feature sums and sums of squares over tokens are also kept (float64),
    for means and variances (DSnoT).
    """

    def __init__(self, n_features: int, device: torch.device, hessian: bool = False, moments: bool = False) -> None:
        self.count = 0  # tokens seen
        self.samples = 0  # sequences seen
        self.moments = moments  # also track the per-feature sums (mean/variance); may be switched on later
        acc = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        self.scaler = torch.zeros(n_features, dtype=torch.float32, device=device)
        self.sum = torch.zeros(n_features, dtype=acc, device=device)
        self.sumsq = torch.zeros(n_features, dtype=acc, device=device)
        self.xtx = torch.zeros(n_features, n_features, dtype=torch.float32, device=device) if hessian else None

    def update(self, x: Tensor) -> None:
        """Add a batch of inputs ``[batch, tokens, features]`` (a 2-D input is one sequence)."""
        if x.dim() != 3:
            x = x.reshape(1, -1, x.shape[-1])
        for seq in x:  # one sequence at a time, in order: the reference's arithmetic
            seq = seq.float()
            n = self.samples
            self.samples = n + 1
            self.scaler *= n / (n + 1)
            self.scaler += torch.norm(seq.t(), p=2, dim=1) ** 2 / (n + 1)
            if self.xtx is not None:
                self.xtx *= n / (n + 1)
                xt = math.sqrt(2 / (n + 1)) * seq.t()
                self.xtx += xt.matmul(xt.t())
        flat = x.reshape(-1, x.shape[-1])
        self.count += flat.shape[0]
        if self.moments:
            flat = flat.to(torch.float32)
            self.sumsq += (flat * flat).sum(0).to(self.sumsq.dtype)
            self.sum += flat.sum(0).to(self.sum.dtype)

    @property
    def col_norm(self) -> Tensor:
        """Wanda's activation norm ``sqrt(scaler)`` = ``||X_j||_2 / sqrt(n_sequences)`` (float32).

        The factor ``1/sqrt(n)`` is common to all features, so it changes no ranking; it is kept
        because the reference scores ``|W| * sqrt(scaler_row)`` with exactly these numbers.
        """
        return torch.sqrt(self.scaler)

    @property
    def col_sq(self) -> Tensor:
        """``||X_j||^2`` summed over all tokens (float32)."""
        return self.scaler * self.samples

    @property
    def mean(self) -> Tensor:
        self._need_moments()
        return (self.sum / max(self.count, 1)).to(torch.float32)

    @property
    def var(self) -> Tensor:
        self._need_moments()
        m = self.sum / max(self.count, 1)
        return (self.sumsq / max(self.count, 1) - m * m).clamp_min(0).to(torch.float32)

    def _need_moments(self) -> None:
        if not self.moments:
            raise RuntimeError("these statistics were gathered without moments (set Method.needs_moments)")

    def hessian(self) -> Tensor:
        """``H = 2 X^T X / n_sequences`` (float32, a fresh tensor the caller may modify)."""
        if self.xtx is None:
            raise RuntimeError("these statistics were gathered without the Hessian")
        return self.xtx.clone()


class Method(ABC):
    """Base class of compression methods (register subclasses in ``METHODS``).

    A method declares its options as a frozen :class:`~prunekit.options.Options` dataclass
    (``Options``); the registry parses and validates them and passes them to ``__init__``.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    needs_calibration: ClassVar[bool] = True
    #: gather ``X^T X`` (costly: only methods that use it)
    needs_hessian: ClassVar[bool] = False
    #: gather per-feature means (for variances), e.g. DSnoT
    needs_moments: ClassVar[bool] = False
    #: pattern kinds the method can produce (``Pattern.kind``); checked before any work
    patterns: ClassVar[tuple[str, ...]] = ("unstructured", "nm")
    #: the method decides for a whole block at once (overrides :meth:`compress_block`)
    block_level: ClassVar[bool] = False
    #: low-rank methods: the option (values ``"rank"`` / ``"params"``) saying what ``Target.sparsity``
    #: removes; ``None`` for methods that zero weights (see :class:`prunekit.families.LowRankConfig`)
    rank_budget_option: ClassVar[str | None] = None

    def __init__(self, options: Options | None = None) -> None:
        self.opts = options if options is not None else self.Options()

    def init_stats(self, linear: nn.Module) -> InputStats | None:
        if not self.needs_calibration:
            return None
        return InputStats(in_features(linear), weight_view(linear).device, hessian=self.needs_hessian,
                          moments=self.needs_moments)

    def update_stats(self, stats: InputStats, inputs: Tensor) -> None:
        stats.update(inputs)

    def prepare(self, linears: dict[str, nn.Module], targets: dict[str, Target]) -> None:
        """Called once by the engine before the block loop with every linear it will compress.

        A no-op for per-layer methods; methods whose per-layer decision is global (WeLore's
        single threshold over all singular values) compute it here, from the weights as they
        are before any block is compressed.
        """

    @abstractmethod
    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        """Compress the linear called ``name`` (its qualified name) to ``target``, in place or by a replacement."""

    def compress_block(self, modules: dict[str, nn.Module], stats: dict[str, InputStats | None],
                       targets: dict[str, Target]) -> dict[str, tuple[CompressResult, float]]:
        """Compress every linear of one block; ``{name: (result, seconds)}``.

        The default compresses each linear on its own with :meth:`compress`. A method whose units
        span several linears (structured pruning) overrides this and sets ``block_level``.
        """
        out = {}
        for name, mod in modules.items():
            t0 = time.perf_counter()
            out[name] = (self.compress(name, mod, stats[name], targets[name]), time.perf_counter() - t0)
        return out

    def summary(self) -> dict[str, Any] | None:
        """The method's global decision for the report (WeLore's tau and reductions); ``None`` if it has none."""
        return None

    def block_needs(self) -> BlockNeeds | None:
        """What :meth:`refine_block` needs the engine to keep (:mod:`~prunekit.methods.blockstep`); ``None``: no block step."""
        return None

    def refine_block(self, data: BlockData) -> dict[str, Any]:
        """Improve the compressed block ``data.block`` as a whole (after its linears, before propagation); what it did."""
        return {}


def apply_keep_mask(linear: nn.Module, keep: Tensor) -> None:
    """Zero the weights where ``keep`` is False (in place, in the module's dtype).

    Pruned weights become ``+0.0``, as the reference code's ``W[mask] = 0`` does: multiplying by
    the mask would leave ``-0.0`` for negative weights, which equals zero but carries a sign bit
    that a bit-exact compressed checkpoint would then have to store.
    """
    w = weight_view(linear)
    w.masked_fill_(~keep.to(w.device), 0.0)


def diag_error(w: Tensor, keep: Tensor, col_sq: Tensor | None) -> float | None:
    """Relative output error under the diagonal approximation of ``X^T X`` (Wanda's view)."""
    if col_sq is None:
        return None
    energy = w.square() * col_sq.unsqueeze(0)
    total = float(energy.sum())
    return float(energy[~keep].sum()) / total if total > 0 else 0.0
