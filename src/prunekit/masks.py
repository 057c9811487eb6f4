"""Pure tensor functions that turn importance scores into keep-masks.

Every function takes a score matrix shaped like the weight (``[out_features, in_features]``)
and returns a boolean mask of the same shape where ``True`` means *keep*. Higher score means
more important. A fraction ``s`` of ``n`` candidates prunes exactly ``int(n * s)`` of them
(floor), the lowest-scoring ones, with ties broken by position (stable sort) so the result is
deterministic and the sparsity exact. This is Wanda's per-row rule; the magnitude and SparseGPT
reference code instead prunes every score ``<= sorted[int(n * s)]`` (one more, plus all ties at
the threshold — many with bf16-valued weights), a difference measured in
``benchmarks/results/reference_parity.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from .errors import ConfigError


#: structured pattern kinds: whole units are removed and the model gets physically smaller
#: (FFN channels, attention heads, both, whole decoder blocks, the FFN sub-block of a block)
STRUCTURED_KINDS = ("channels", "heads", "width", "blocks", "ffn")


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go: anywhere (``unstructured``), ``n`` kept out of every ``m``, or whole structures.

    N:M follows the hardware convention (NVIDIA 2:4): ``n`` non-zeros in every group of ``m``
    consecutive weights along the input dimension, so its sparsity is ``1 - n/m``. The structured
    kinds (:data:`STRUCTURED_KINDS`) remove whole units, see :mod:`prunekit.structured`.
    """

    kind: str = "unstructured"
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("unstructured", "nm", *STRUCTURED_KINDS):
            raise ConfigError(f"pattern kind {self.kind!r} is not one of 'unstructured', 'nm', "
                              + ", ".join(repr(k) for k in STRUCTURED_KINDS))
        if self.kind == "nm" and not (0 < self.n < self.m):
            raise ConfigError(
                f"N:M pattern {self.n}:{self.m} needs 0 < N < M (N weights kept in every M); "
                "e.g. 2:4 or 4:8"
            )

    @classmethod
    def parse(cls, text: "str | Pattern") -> "Pattern":
        """Parse ``"unstructured"``, ``"2:4"``, ``"4:8"`` (any ``N:M``) or a structured kind (``"channels"`` …)."""
        if isinstance(text, Pattern):
            return text
        t = str(text).strip().lower()
        if t in ("unstructured", "none", ""):
            return cls()
        if t in STRUCTURED_KINDS:
            return cls(t)
        if ":" in t:
            a, _, b = t.partition(":")
            try:
                n, m = int(a), int(b)
            except ValueError:
                raise ConfigError(f"pattern {text!r} is not 'unstructured' or N:M such as '2:4'") from None
            return cls("nm", n, m)
        raise ConfigError(f"pattern {text!r} is not 'unstructured', N:M such as '2:4', or one of "
                          + ", ".join(STRUCTURED_KINDS))

    @property
    def is_nm(self) -> bool:
        return self.kind == "nm"

    @property
    def is_structured(self) -> bool:
        """Whole heads, channels or blocks are removed (the model gets smaller)."""
        return self.kind in STRUCTURED_KINDS

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes, ``None`` for unstructured."""
        return 1.0 - self.n / self.m if self.is_nm else None

    def check_width(self, in_features: int, name: str = "layer") -> None:
        """Raise a clear error if N:M groups do not tile ``in_features``."""
        if self.is_nm and in_features % self.m:
            raise ConfigError(
                f"N:M pattern {self} needs M={self.m} to divide the input width of {name} "
                f"({in_features} % {self.m} = {in_features % self.m}); choose an M that divides "
                f"{in_features} or exclude this layer with --exclude"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else self.kind


def _prune_lowest(scores: Tensor, k: int, dim: int = -1) -> Tensor:
    """Keep-mask that prunes the ``k`` lowest entries along ``dim`` (stable ties)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    idx = torch.sort(scores, dim=dim, stable=True).indices.narrow(dim, 0, k)
    return keep.scatter_(dim, idx, False)


def matrix_mask(scores: Tensor, sparsity: float) -> Tensor:
    """One threshold for the whole matrix: prune the ``int(numel*s)`` lowest scores."""
    flat = scores.reshape(-1)
    return _prune_lowest(flat, int(flat.numel() * sparsity)).view_as(scores)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Per output row: prune the ``int(in_features*s)`` lowest scores of each row (Wanda)."""
    return _prune_lowest(scores, int(scores.shape[-1] * sparsity), dim=-1)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input columns.

    The ``m - n`` pruned entries of a group are chosen with ``torch.topk(largest=False)``, as the
    Wanda and SparseGPT reference code does, so ties (common in dequantized weights, where a
    32-weight block has only 16 distinct values) are broken the same way as there.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ConfigError(f"N:M with M={m} needs M to divide the input width {cols}")
    groups = scores.reshape(rows, cols // m, m)
    pruned = torch.topk(groups, m - n, dim=-1, largest=False).indices
    return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, pruned, False).reshape(rows, cols)


def keep_mask(scores: Tensor, sparsity: float, pattern: Pattern, per_row: bool) -> Tensor:
    """Dispatch on the pattern: N:M groups, else per-row or per-matrix selection."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return row_mask(scores, sparsity) if per_row else matrix_mask(scores, sparsity)


def is_nm_sparse(weight: Tensor, n: int, m: int) -> bool:
    """True if every group of ``m`` consecutive input weights has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())
