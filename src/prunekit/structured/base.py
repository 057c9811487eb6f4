"""The two kinds of structured criteria, and the statistics they read.

* :class:`UnitCriterion` scores the *units inside* a block — query heads, key/value groups,
  FFN channels — for the ``channels``, ``heads`` and ``width`` patterns, and may compensate the
  output projection for what was removed (FLAP's bias, SlimGPT's OBS update). The sequential
  engine drives it block by block (:class:`~prunekit.structured.method.UnitPruner`).
* :class:`BlockCriterion` ranks *whole blocks* (``blocks``) or their FFN sub-blocks (``ffn``)
  from a dense pass over the calibration set (ShortGPT's block influence, measured perplexity).

Criteria register themselves in :data:`prunekit.registry.STRUCTURED`, one file each under
``structured/criteria/``; a name may repeat an unstructured method's (``magnitude``, ``wanda``),
the pattern decides which registry ``--method`` is looked up in. Lower score = removed first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..methods.base import InputStats
from ..models.structure import AttentionParts, FFNParts
from ..options import Options, option

#: FFN channels are removed in multiples of this when 256 does not divide the widths (fast CPU matmul widths,
#: docs/structured.md; also q8_0's block, docs/deploy.md)
DEFAULT_MULTIPLE = 32


@dataclass
class UnitStats:
    """Calibration statistics of one block's four distinct linear inputs (``None`` without calibration).

    ``attn_in``: the input of q/k/v; ``attn_out``: the input of the attention output projection
    (the heads' outputs, concatenated); ``ffn_in``: the FFN input; ``ffn_out``: the input of the FFN
    output projection (the channels' activations).
    """

    attn_in: InputStats | None = None
    attn_out: InputStats | None = None
    ffn_in: InputStats | None = None
    ffn_out: InputStats | None = None


@dataclass(frozen=True)
class UnitOptions(Options):
    """Options every unit criterion has: the rounding of channels and the grouped-query rule."""

    multiple: int = option(0, "FFN channels are removed in multiples of this (--width-multiple); 0 = auto: 256 "
                              "where it divides every FFN width (llama.cpp's K-quants stay usable), else 32", lo=0)
    gqa: str = option("heads", "grouped-query attention: remove the same number of query heads from every "
                      "key/value group, or whole key/value groups", choices=("heads", "groups"))


def group_sum(values: Tensor, size: int) -> Tensor:
    """Sum consecutive runs of ``size`` entries (feature scores -> head scores)."""
    return values.reshape(-1, size).sum(1)


class StructuredCriterion:
    """Common base: a name, typed options and the patterns a criterion serves."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    patterns: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = True

    def __init__(self, options: Options | None = None) -> None:
        self.opts = options if options is not None else self.Options()


class UnitCriterion(StructuredCriterion):
    """Scores heads and channels of one block (``channels``, ``heads``, ``width``).

    Subclasses implement :meth:`head_scores` and :meth:`channel_scores`; they may override
    :meth:`kv_scores` (what a key/value group's own k/v rows are worth), the selections (SlimGPT
    chooses greedily with Hessian downdates) and :meth:`compensate`.
    """

    patterns = ("channels", "heads", "width")
    Options = UnitOptions
    #: gather per-feature means/variances of the linears' inputs (FLAP)
    needs_moments: ClassVar[bool] = False
    #: gather ``X^T X`` of the output projections' inputs (SlimGPT)
    needs_hessian: ClassVar[bool] = False

    def head_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        """Importance of each query head (``[heads]``); ``w`` has float32 q, k, v, o as ``[out, in]``."""
        raise NotImplementedError

    def kv_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        """Importance of each key/value group's own k/v rows (``[kv_heads]``); default 0."""
        return torch.zeros(attn.kv_heads)

    def channel_scores(self, w_in: list[Tensor], w_out: Tensor, ffn: FFNParts, stats: UnitStats) -> Tensor:
        """Importance of each FFN channel (``[width]``) from the input projections and the output projection."""
        raise NotImplementedError

    def group_scores(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats) -> Tensor:
        """A key/value group's worth: its query heads' scores plus its own k/v rows'."""
        return group_sum(self.head_scores(w, attn, stats), attn.group_size) + self.kv_scores(w, attn, stats)

    def select_heads(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats, per_group: int) -> list[int]:
        """``per_group`` query heads of every key/value group, the lowest-scoring ones."""
        scores = self.head_scores(w, attn, stats).reshape(attn.kv_heads, attn.group_size)
        low = torch.argsort(scores, dim=1, stable=True)[:, :per_group]
        return sorted(int(g * attn.group_size + j) for g in range(attn.kv_heads) for j in low[g])

    def select_groups(self, w: dict[str, Tensor], attn: AttentionParts, stats: UnitStats, n: int) -> list[int]:
        """The ``n`` lowest-scoring key/value groups."""
        return sorted(int(i) for i in torch.argsort(self.group_scores(w, attn, stats), stable=True)[:n])

    def select_channels(self, w_in: list[Tensor], w_out: Tensor, ffn: FFNParts, stats: UnitStats, n: int) -> list[int]:
        """The ``n`` lowest-scoring FFN channels."""
        return sorted(int(i) for i in torch.argsort(self.channel_scores(w_in, w_out, ffn, stats), stable=True)[:n])

    def compensate(self, w: Tensor, bias: Tensor | None, removed: Tensor,
                   stats: InputStats | None) -> tuple[Tensor, Tensor | None]:
        """The output projection after its input columns ``removed`` (bool) go: ``(W', bias')``.

        The default drops them without compensation (``W'`` = ``W`` with those columns zeroed).
        """
        w = w.clone()
        w[:, removed] = 0
        return w, bias


@dataclass(frozen=True)
class BlockOptions(Options):
    """Options every block criterion has."""

    bias: bool = option(False, "pattern ffn: a dropped FFN's mean output on the calibration set becomes its output "
                               "projection's bias (FLAP-style compensation; FFN-SkipLLM drops it outright)")
    cache: bool = option(True, "reuse scores cached on disk for an identical model and calibration")


class BlockCriterion(StructuredCriterion):
    """Ranks whole decoder blocks (``blocks``) or their FFN sub-blocks (``ffn``) on calibration data."""

    patterns = ("blocks", "ffn")
    Options = BlockOptions

    def block_scores(self, model: nn.Module, calib_ids: Tensor, kind: str, batch_size: int,
                     candidates: list[int]) -> dict[int, float]:
        """``{block index: importance}`` of removing each candidate block (``kind="blocks"``) or its FFN."""
        raise NotImplementedError
