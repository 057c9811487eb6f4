"""Frozen, validated configuration objects (and their YAML/JSON round trip).

Every check raises ``ValueError`` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .masks import Pattern
from .errors import ConfigError


def _check_int(name: str, value: int, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name}={value!r} is invalid: it must be an integer {rng}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: ``nsamples`` windows of ``seqlen`` tokens drawn from ``dataset``.

    ``dataset`` is a registered name (``austen``, ``gsm8k``, ``c4``, ``wikitext2`` …) or a path to
    a ``.txt`` / ``.jsonl`` file (``text_field`` picks the JSONL field).
    """

    dataset: str = "austen"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    text_field: str = "text"
    #: cut windows from the concatenated documents (None: the dataset's default)
    packing: bool | None = None

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ConfigError("calibration dataset is empty: pass a dataset name (see `prunekit ls`) or a file path")
        _check_int("nsamples", self.nsamples, 1)
        _check_int("seqlen", self.seqlen, 2)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how.

    Attributes:
        method: registered method name (``magnitude``, ``wanda``, ``sparsegpt`` …); with a
            structured pattern, a registered structured criterion (``flap``, ``slimgpt``,
            ``shortgpt`` …). ``None``: ``wanda``, or the structured pattern's default criterion.
        sparsity: target fraction of weights removed over the selected linears, in [0, 1).
            ``None`` with an N:M pattern means the pattern's own sparsity (2:4 → 0.5).
        pattern: ``unstructured``, ``N:M`` (N kept in every M consecutive inputs), or a structured
            kind: ``channels``, ``heads``, ``width``, ``blocks``, ``ffn`` (whole units removed).
        allocation: registered allocation strategy (``uniform`` …) deciding per-layer sparsity.
        include / exclude: regexes on qualified linear names (default: every decoder linear).
        method_options / allocation_options: extra keyword options for the method / allocator.
        calib: calibration data settings (ignored by methods that need no calibration).
        refine / refine_options: a registered post-step run on every layer right after the
            method masked it (``dsnot``), and its keyword options; ``None`` = no refinement.
    """

    method: str | None = None
    sparsity: float | None = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    method_options: Mapping[str, Any] = field(default_factory=dict)
    allocation_options: Mapping[str, Any] = field(default_factory=dict)
    calib: CalibConfig = field(default_factory=CalibConfig)
    refine: str | None = None
    refine_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.refine in ("", "none"):
            object.__setattr__(self, "refine", None)
        if self.refine_options and self.refine is None:
            raise ConfigError(f"refine_options={dict(self.refine_options)} given without a refiner: add --refine dsnot")
        pat = Pattern.parse(self.pattern)  # raises a clear ValueError
        object.__setattr__(self, "pattern", str(pat))
        if self.method is None:
            from .structured.defaults import default_criterion

            object.__setattr__(self, "method", default_criterion(pat.kind) if pat.is_structured else "wanda")
        if pat.is_structured and self.refine is not None:
            from .registry import REFINERS

            if not getattr(REFINERS.get(self.refine), "structured", False):
                raise ConfigError(f"refine={self.refine!r} works on unstructured masks, not on pattern {pat}; drop "
                                  "--refine (after structured pruning: --refine reconstruct)")
            if pat.kind in ("blocks", "ffn"):
                raise ConfigError(f"refine={self.refine!r} refits the linears left in a block; pattern {pat} removes "
                                  "whole blocks or FFNs: use channels, heads or width, or drop --refine")
        for key in ("include", "exclude"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
            for rx in getattr(self, key):
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ConfigError(f"--{key} regex {rx!r} is invalid ({e}); fix it, e.g. 'mlp' or 'self_attn'") from None
        if self.sparsity is None:
            if not pat.is_nm:
                raise ConfigError(f"sparsity is required for pattern {pat}: e.g. --sparsity 0.5")
            object.__setattr__(self, "sparsity", pat.sparsity)
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= float(s) < 1.0):
            raise ConfigError(f"sparsity={s!r} is out of range: it must be a fraction in [0, 1), e.g. 0.5 for 50%")
        object.__setattr__(self, "sparsity", float(s))
        if pat.is_nm and self.allocation == "uniform" and abs(self.sparsity - pat.sparsity) > 1e-9:
            raise ConfigError(
                f"sparsity={self.sparsity} contradicts pattern {pat} (which is {pat.sparsity:.0%} sparse); "
                "drop --sparsity or use a non-uniform --allocation for mixed N:M"
            )
        if not isinstance(self.calib, CalibConfig):
            object.__setattr__(self, "calib", CalibConfig(**dict(self.calib)))
        self._typed_options()

    def _typed_options(self) -> None:
        """Names checked and option values converted by each component's declared ``Options``."""
        from .registry import ALLOCATORS, METHODS, REFINERS, STRUCTURED

        methods = STRUCTURED if self.pattern_obj.is_structured else METHODS
        for reg, name, key in ((methods, self.method, "method_options"), (ALLOCATORS, self.allocation,
                               "allocation_options"), (REFINERS, self.refine, "refine_options")):
            raw = dict(getattr(self, key))
            if name is None:
                continue
            opts = reg.get(name).Options.parse(raw, f"{reg.kind} {name!r}")
            object.__setattr__(self, key, {k.replace("-", "_"): getattr(opts, k.replace("-", "_")) for k in raw})

    @property
    def pattern_obj(self) -> Pattern:
        return Pattern.parse(self.pattern)


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity evaluation: non-overlapping ``seqlen`` windows of each dataset's test text."""

    datasets: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        _check_int("eval seqlen", self.seqlen, 2)
        _check_int("eval batch_size", self.batch_size, 1)
        if self.max_windows is not None:
            _check_int("max_windows", self.max_windows, 1)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/YAML-serialisable dict of a config (nested configs included)."""
    return {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(cfg).items()}


def load_yaml(path: str | Path) -> PruneConfig:
    """Read a :class:`PruneConfig` from YAML (keys as in :func:`to_dict`)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    calib = data.pop("calib", {}) or {}
    return PruneConfig(**data, calib=CalibConfig(**calib))


def save_yaml(cfg: PruneConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
