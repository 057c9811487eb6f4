"""Frozen, validated configuration objects (and their YAML/JSON round trip).

Every check raises ``ValueError`` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .data.calibration import CalibConfig
from .errors import ConfigError
from .masks import Pattern
from .options import check_int as _check_int


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
        from .families import to_family  # the families validate; this front only normalises its own fields

        pat = Pattern.parse(self.pattern)  # raises a clear ValueError
        object.__setattr__(self, "pattern", str(pat))
        for key in ("include", "exclude"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if not isinstance(self.calib, CalibConfig):
            object.__setattr__(self, "calib", CalibConfig(**dict(self.calib)))
        family = to_family(self)
        front = family.front()
        for key in ("method", "sparsity", "method_options", "allocation_options", "refine", "refine_options"):
            object.__setattr__(self, key, front[key])
        object.__setattr__(self, "_family", family)

    def family(self):
        """The typed family config this flat config says (:class:`~prunekit.families.SparseConfig`,
        :class:`~prunekit.families.StructuredConfig` or :class:`~prunekit.families.LowRankConfig`)."""
        return self._family

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


@dataclass(frozen=True)
class ActivationSparsityConfig:
    """Training-free activation sparsity: zero the small entries of activations at inference.

    Attributes:
        sparsity: target fraction of the thresholded activations that are zero, in [0, 1). For
            ``teal`` it is the parameter-weighted mean over every decoder linear's input (the
            fraction of weight reads a sparse kernel skips); for ``cats`` / ``chess`` the fraction
            of the gated MLP's intermediate channels (and, for ``chess``, of the q/o inputs).
        method: registered activation method: ``teal`` (every linear's input, one threshold per
            linear), ``cats`` (the gate activation of the MLP), ``chess`` (channel-wise gate
            thresholds plus the inputs of q and o).
        allocation: ``uniform`` (every site at ``sparsity``) or ``greedy`` (TEAL's block-wise
            greedy search; ``teal`` only).
        calib: calibration text (thresholds are quantiles of its activations).
        max_tokens: calibration tokens sampled per site for the quantiles (evenly spread, seeded).
        greedy_tokens: tokens of the first calibration sequence the greedy search scores blocks on.
        greedy_step: the greedy search's step, in effective sparsity of one average linear.
        propagate: calibrate block i+1 on block i's sparsified outputs (what inference sees);
            ``False``: every block on the dense model's activations (TEAL's reference code).
        include / exclude: regexes on qualified names of the sites (linears for ``teal``).
    """

    sparsity: float = 0.4
    method: str = "teal"
    allocation: str = "uniform"
    calib: CalibConfig = field(default_factory=CalibConfig)
    max_tokens: int = 4096
    greedy_tokens: int = 512
    greedy_step: float = 0.05
    propagate: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= float(s) < 1.0):
            raise ConfigError(f"activation sparsity={s!r} is out of range: it must be a fraction in [0, 1), e.g. 0.4")
        object.__setattr__(self, "sparsity", float(s))
        from .registry import ACTIVATION_METHODS

        object.__setattr__(self, "method", str(self.method).lower())
        ACTIVATION_METHODS.get(self.method)  # unknown name: one line naming the choices
        if self.allocation not in ("uniform", "greedy"):
            raise ConfigError(f"activation allocation={self.allocation!r} is unknown; choose uniform or greedy")
        if self.allocation == "greedy" and not ACTIVATION_METHODS.get(self.method).supports_greedy:
            raise ConfigError(f"activation allocation 'greedy' works with method teal, not {self.method!r}; "
                              "use --act-allocation uniform or --act-method teal")
        if not isinstance(self.calib, CalibConfig):
            object.__setattr__(self, "calib", CalibConfig(**dict(self.calib)))
        _check_int("activation max_tokens", self.max_tokens, 16)
        _check_int("activation greedy_tokens", self.greedy_tokens, 2)
        g = self.greedy_step
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (0.0 < float(g) <= 0.5):
            raise ConfigError(f"activation greedy_step={g!r} is out of range: it must be in (0, 0.5], e.g. 0.05")
        for key in ("include", "exclude"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
            for rx in getattr(self, key):
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ConfigError(f"activation {key} regex {rx!r} is invalid ({e}); fix it, e.g. 'mlp'") from None


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
