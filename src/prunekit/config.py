"""Frozen, validated configuration objects (and their YAML/JSON round trip).

Every check raises ``ValueError`` naming the field, the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .data.calibration import CalibConfig
from ._deprecated import moved
from .masks import Pattern
from .options import check_int as _check_int, to_dict


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
    """Perplexity evaluation: non-overlapping ``seqlen`` windows of each dataset's test text.

    ``prompt``: the first that many tokens of each window are a prompt, computed densely under
    activation thresholds and not scored (as generation sees the model; TEAL's protocol is
    ``seqlen // 2``); 0 scores every token with every token thresholded.
    """

    datasets: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int = 1
    prompt: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "datasets", tuple(self.datasets))
        _check_int("eval seqlen", self.seqlen, 2)
        _check_int("eval batch_size", self.batch_size, 1)
        if self.max_windows is not None:
            _check_int("max_windows", self.max_windows, 1)
        _check_int("eval prompt", self.prompt, 0, self.seqlen - 2)  # at least one token scored


def load_yaml(path: str | Path) -> PruneConfig:
    """Read a :class:`PruneConfig` from YAML (keys as in :func:`to_dict`)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    calib = data.pop("calib", {}) or {}
    return PruneConfig(**data, calib=CalibConfig(**calib))


def save_yaml(cfg: PruneConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def __getattr__(name: str):
    """``ActivationSparsityConfig`` is a compression family now: :mod:`prunekit.families.activation` (deprecated here)."""
    if name != "ActivationSparsityConfig":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .families import activation

    return moved(__name__, name, activation)
