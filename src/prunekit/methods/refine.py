"""Post-steps that improve a layer right after a sparse method compressed it (e.g. DSnoT).

A :class:`Refiner` sees the layer after ``compress``, the dense weight from before it, the
calibration statistics (with per-feature moments, and ``X^T X`` when it asks for it) and the
target. A refiner may also work on the whole compressed block (block reconstruction): it declares
what the engine must keep in :meth:`Refiner.block_needs` and gets the block in
:meth:`Refiner.refine_block`. :class:`RefinedMethod` wraps any registered method with a refiner,
so the engine needs no knowledge of refinement: it sees one :class:`Method` that gathers the union
of the statistics both need.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import in_features, weight_view
from ..options import Options
from .base import CompressResult, InputStats, Method, Target
from .blockstep import BlockData, BlockNeeds

log = logging.getLogger(__name__)


class Refiner(ABC):
    """Base class of post-compression refiners (register subclasses in ``REFINERS``)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    needs_moments: ClassVar[bool] = True
    #: gather ``X^T X`` for :meth:`refine` (Gram-matrix refiners)
    needs_hessian: ClassVar[bool] = False
    #: also works after structured pruning (zeroed heads/channels stay zero)
    structured: ClassVar[bool] = False

    def __init__(self, options: Options | None = None) -> None:
        self.opts = options if options is not None else self.Options()

    @classmethod
    def structured_refusal(cls, options) -> str | None:
        """Why these ``options`` (a mapping) cannot follow structured pruning, or ``None`` (a ``structured``
        refiner whose options may move single weights overrides this)."""
        return None

    @abstractmethod
    def refine(self, name: str, linear: nn.Module, dense: Tensor, stats: InputStats, target: Target) -> dict[str, Any]:
        """Improve ``linear`` (qualified ``name``, already compressed from ``dense``) in place; return what it did."""

    def block_needs(self) -> BlockNeeds | None:
        """The activations :meth:`refine_block` needs (``None``: the refiner works per layer only)."""
        return None

    def refine_block(self, data: BlockData) -> dict[str, Any]:
        """Improve the compressed block as a whole; return what it did."""
        return {}


class RefinedMethod(Method):
    """``inner`` followed by ``refiner`` on every layer ``inner`` masks in place.

    Layers that ``inner`` replaces by another module (low rank) are left as they are.
    """

    def __init__(self, inner: Method, refiner: Refiner) -> None:
        super().__init__(inner.opts)
        self.inner, self.refiner = inner, refiner
        self.name = inner.name
        self.patterns = inner.patterns
        self.needs_calibration = True  # the refiner needs input statistics even after magnitude
        self.needs_hessian = inner.needs_hessian or refiner.needs_hessian
        self.needs_moments = refiner.needs_moments or inner.needs_moments
        self.block_level = inner.block_level

    def init_stats(self, linear: nn.Module) -> InputStats:
        st = self.inner.init_stats(linear) if self.inner.needs_calibration else None
        if st is None:
            st = InputStats(in_features(linear), weight_view(linear).device, hessian=self.refiner.needs_hessian,
                            moments=self.refiner.needs_moments)
        elif self.refiner.needs_hessian and st.xtx is None:  # before any update: accumulated like any Hessian
            n = st.scaler.numel()
            st.xtx = torch.zeros(n, n, dtype=torch.float32, device=st.scaler.device)
        st.moments = self.refiner.needs_moments or st.moments
        return st

    def update_stats(self, stats: InputStats, inputs: Tensor) -> None:
        self.inner.update_stats(stats, inputs)

    def prepare(self, linears: dict[str, nn.Module], targets: dict[str, Target]) -> None:
        self.inner.prepare(linears, targets)

    def summary(self) -> dict[str, Any] | None:
        return self.inner.summary()

    def block_needs(self) -> BlockNeeds | None:
        return self.refiner.block_needs()

    def refine_block(self, data: BlockData) -> dict[str, Any]:
        return self.refiner.refine_block(data)

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        dense = weight_view(linear).detach().clone()
        res = self.inner.compress(name, linear, stats if self.inner.needs_calibration else None, target)
        return self._refined(name, linear, dense, stats, target, res)

    def compress_block(self, modules: dict[str, nn.Module], stats: dict[str, InputStats | None],
                       targets: dict[str, Target]) -> dict[str, tuple[CompressResult, float]]:
        if not self.inner.block_level:
            return super().compress_block(modules, stats, targets)
        dense = {n: weight_view(m).detach().clone() for n, m in modules.items()}
        out = self.inner.compress_block(modules, stats, targets)
        for n, (res, secs) in out.items():
            t0 = time.perf_counter()
            self._refined(n, modules[n], dense[n], stats[n], targets[n], res)
            out[n] = (res, secs + time.perf_counter() - t0)
        return out

    def _refined(self, name: str, linear: nn.Module, dense: Tensor, stats: InputStats | None, target: Target,
                 res: CompressResult) -> CompressResult:
        if res.module is not None:
            res.info["refine"] = {"skipped": "replaced module"}
            return res
        t0 = time.perf_counter()
        info = self.refiner.refine(name, linear, dense, stats, target)
        info["seconds"] = time.perf_counter() - t0
        res.info["refine"] = {"name": self.refiner.name, **info}
        return res


def skip_matcher(pattern: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"skip={pattern!r} is not a valid regex ({e}); fix the pattern or pass skip= for none") from None
