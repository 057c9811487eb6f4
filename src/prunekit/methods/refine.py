"""Post-steps that improve a layer right after a sparse method compressed it (e.g. DSnoT).

A :class:`Refiner` sees the layer after ``compress``, the dense weight from before it, the
calibration statistics (with per-feature moments) and the target. :class:`RefinedMethod` wraps
any registered method with a refiner, so the engine needs no knowledge of refinement: it sees
one :class:`Method` that gathers the union of the statistics both need.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import ConfigError
from ..models import in_features, weight_view
from ..options import Options
from .base import CompressResult, InputStats, Method, Target

log = logging.getLogger(__name__)


class Refiner(ABC):
    """Base class of post-compression refiners (register subclasses in ``REFINERS``)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    needs_moments: ClassVar[bool] = True

    def __init__(self, options: Options | None = None) -> None:
        self.opts = options if options is not None else self.Options()

    @abstractmethod
    def refine(self, name: str, linear: nn.Module, dense: Tensor, stats: InputStats, target: Target) -> dict[str, Any]:
        """Improve ``linear`` (qualified ``name``, already compressed from ``dense``) in place; return what it did."""


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
        self.needs_hessian = inner.needs_hessian
        self.needs_moments = True

    def init_stats(self, linear: nn.Module) -> InputStats:
        st = self.inner.init_stats(linear) if self.inner.needs_calibration else None
        if st is None:
            st = InputStats(in_features(linear), weight_view(linear).device, moments=True)
        st.moments = self.refiner.needs_moments or st.moments
        return st

    def update_stats(self, stats: InputStats, inputs: Tensor) -> None:
        self.inner.update_stats(stats, inputs)

    def prepare(self, linears: dict[str, nn.Module], targets: dict[str, Target]) -> None:
        self.inner.prepare(linears, targets)

    def summary(self) -> dict[str, Any] | None:
        return self.inner.summary()

    def compress(self, name: str, linear: nn.Module, stats: InputStats | None, target: Target) -> CompressResult:
        dense = weight_view(linear).detach().clone()
        res = self.inner.compress(name, linear, stats if self.inner.needs_calibration else None, target)
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
