"""Task interface, run settings and results shared by every task family.

A task is a registered factory in :data:`prunekit.registry.TASKS` that takes
``(data_dir, **options)`` and returns a :class:`Task`. A task loads its examples lazily and
``run`` scores them on a model; every family returns a :class:`TaskResult` with metrics,
their standard errors, the number of examples and the throughput.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

from torch import nn

from .lm import DEFAULT_BATCH, Counter
from ...errors import ConfigError


@dataclass(frozen=True)
class TaskSettings:
    """How tasks run (one object for every task of a run).

    Attributes:
        limit: score only the first ``limit`` examples of each task (None: all).
        limits: per-task overrides of ``limit`` (task spec → limit).
        batch_size: contexts (or prompts) per forward pass.
        max_length: longest sequence fed to the model (None: model context, at most 2048).
        ppl_seqlen / ppl_max_windows / ppl_batch_size: perplexity-suite settings.
        data_dir: the data directory (None: ``$PRUNEKIT_DATA``).
    """

    limit: int | None = None
    limits: tuple[tuple[str, int], ...] = ()
    batch_size: int = DEFAULT_BATCH
    max_length: int | None = None
    ppl_seqlen: int = 2048
    ppl_max_windows: int | None = None
    ppl_batch_size: int = 1
    data_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "limits", tuple((str(k), v) for k, v in dict(self.limits).items()))
        for name, value in (("limit", self.limit), *((f"limit for {k}", v) for k, v in self.limits)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= 1")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"task batch_size={self.batch_size!r} is invalid: it must be an integer >= 1")
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length} is invalid: it must be >= 8 tokens")

    def limit_for(self, spec: str) -> int | None:
        return dict(self.limits).get(spec, self.limit)


@dataclass
class TaskResult:
    """Scores of one task on one model.

    ``metrics`` / ``stderr`` share keys (``acc``, ``acc_norm``, ``exact_match``, ``ppl`` …);
    ``main`` names the headline metric and ``higher_is_better`` its direction.
    """

    task: str
    family: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    n: int
    main: str
    higher_is_better: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0
    examples_per_s: float = 0.0
    tokens_per_s: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)  # the first few predictions, for reading

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def value(self) -> float:
        return self.metrics[self.main]


Progress = Callable[[int, int], None]


class Task:
    """Base class: ``load()`` the examples once, ``run()`` them on a model."""

    family: ClassVar[str] = ""
    main_metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

    def __init__(self, name: str) -> None:
        self.name = name

    def describe(self) -> dict[str, Any]:
        """Settings that define the numbers (prompt format, shots, split), for the report."""
        return {}

    def run(self, model: nn.Module, tokenizer, settings: TaskSettings, limit: int | None = None,
            progress: Progress | None = None) -> TaskResult:  # pragma: no cover - interface
        raise NotImplementedError

    # helpers ---------------------------------------------------------------------------
    def _result(self, metrics, stderr, n, counter: Counter, t0: float, samples=None, **extra) -> TaskResult:
        secs = time.perf_counter() - t0
        return TaskResult(self.name, self.family, metrics, stderr, n, self.main_metric, self.higher_is_better,
                          {**self.describe(), **extra}, secs, counter.tokens, n / secs if secs > 0 else 0.0,
                          counter.tokens / secs if secs > 0 else 0.0, list(samples or [])[:5])


def take(examples: list, limit: int | None) -> list:
    if not examples:
        raise ConfigError("the task has no examples; check its data file")
    return examples if limit is None else examples[:limit]
