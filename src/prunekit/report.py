"""What a compression run did, per linear and per block, as data (and JSON)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    params: int
    target: float
    pattern: str
    sparsity: float
    error: float | None
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockRecord:
    index: int
    seconds: float
    rel_error: float | None  # ||Y' - Y|| / ||Y|| of the block output on the first calibration batch
    peak_rss_mb: float
    peak_device_mb: float | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what a block step did (block reconstruction)


@dataclass
class Report:
    """The full record of a prune run; ``to_json`` is what gets saved beside the model."""

    method: str
    target_sparsity: float
    pattern: str
    allocation: str = "uniform"
    layers: list[LayerRecord] = field(default_factory=list)
    blocks: list[BlockRecord] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Parameter-weighted fraction of zeros over the compressed linears."""
        p = self.params
        return sum(r.sparsity * r.params for r in self.layers) / p if p else 0.0

    @property
    def allocated_sparsity(self) -> float:
        """Parameter-weighted mean of the per-layer targets (equals the target by construction)."""
        p = self.params
        return sum(r.target * r.params for r in self.layers) / p if p else 0.0

    @property
    def peak_rss_mb(self) -> float:
        return max((b.peak_rss_mb for b in self.blocks), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = {
            "params_compressed": self.params,
            "sparsity": self.sparsity,
            "allocated_sparsity": self.allocated_sparsity,
            "seconds": self.seconds,
            "peak_rss_mb": self.peak_rss_mb,
        }
        d["environment"] = environment()
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)


@dataclass(frozen=True)
class RunInfo:
    """What a report says about the run as a whole, known before the engine starts.

    ``prune`` fills it from the configuration; the engine adds what it measured and builds the
    complete :class:`Report` in one step (:meth:`report`).
    """

    method: str
    target_sparsity: float
    pattern: str
    allocation: str = "uniform"
    calibration: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    started: float | None = None  # time.perf_counter() when the run began (default: when the engine began)

    @classmethod
    def of(cls, method: str, targets: Mapping[str, Any]) -> "RunInfo":
        """The defaults for a bare engine run: the targets' mean sparsity and their patterns."""
        ts = list(targets.values())
        mean = sum(t.sparsity for t in ts) / len(ts) if ts else 0.0
        return cls(method, mean, ",".join(sorted({str(t.pattern) for t in ts})))

    def report(self, layers: list[LayerRecord], blocks: list[BlockRecord], method_summary: dict | None,
               engine_started: float) -> Report:
        extra = dict(self.extra)
        if method_summary:
            extra["method_summary"] = method_summary
        start = self.started if self.started is not None else engine_started
        return Report(self.method, self.target_sparsity, self.pattern, self.allocation, layers, blocks,
                      time.perf_counter() - start, dict(self.calibration), dict(self.config), {}, extra)


def environment() -> dict[str, Any]:
    """Versions and machine facts, so every number can be traced to where it was measured."""
    import torch
    import transformers

    from . import __version__

    env = {
        "prunekit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
