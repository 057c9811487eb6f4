"""The factorized linear layer low-rank methods produce (saved and loaded by :mod:`prunekit.formats.lowrank`).

A :class:`LowRankLinear` computes ``y = B (A x) + b`` with ``A = sqrt(S_k) V_k^T`` (``[k, in]``)
and ``B = U_k sqrt(S_k)`` (``[out, k]``): two ordinary matmuls whose parameter count
``k (in + out)`` is below the dense ``in * out`` exactly when ``k < in*out / (in + out)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._deprecated import moved
from ..errors import ConfigError
from .blocks import set_module


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``k`` replacement of an ``[out, in]`` linear layer.

    ``down.weight`` is ``A = sqrt(S_k) V_k^T`` and ``up.weight`` is ``B = U_k sqrt(S_k)``; the
    bias (if any) lives on ``up``. Splitting ``sqrt(S)`` evenly keeps both factors on the same
    scale, which matters in bf16/fp16.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not (1 <= rank <= min(in_features, out_features)):
            raise ConfigError(f"rank {rank} must lie in [1, min(in, out) = {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, a: Tensor, b: Tensor, bias: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Build from ``A`` (``[k, in]``) and ``B`` (``[out, k]``), cast to ``dtype`` (default ``a``'s)."""
        k, n = a.shape
        m, k2 = b.shape
        if k != k2:
            raise ConfigError(f"factor shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
        dtype = dtype or a.dtype
        mod = cls(n, m, k, bias is not None, dtype=dtype, device=a.device)
        with torch.no_grad():
            mod.down.weight.copy_(a)
            mod.up.weight.copy_(b)
            if bias is not None:
                mod.up.bias.copy_(bias)
        return mod

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def nonzero_params(self) -> int:
        """Stored weights (bias excluded, as for the dense layer's sparsity)."""
        return self.rank * (self.in_features + self.out_features)

    def merged_weight(self) -> Tensor:
        """The dense ``[out, in]`` product ``B A`` (computed in float32, returned in the module dtype)."""
        w = self.up.weight.detach().float() @ self.down.weight.detach().float()
        return w.to(self.up.weight.dtype)

    def to_linear(self) -> nn.Linear:
        """An ordinary ``nn.Linear`` holding the merged weight (for plain-transformers export)."""
        w = self.up.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(self.merged_weight())
            if self.up.bias is not None:
                lin.bias.copy_(self.up.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Qualified name → every :class:`LowRankLinear` inside ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def merge_lowrank(model: nn.Module) -> int:
    """Replace every :class:`LowRankLinear` by a dense ``nn.Linear`` (in place); returns how many."""
    mods = lowrank_modules(model)
    for name, mod in mods.items():
        set_module(model, name, mod.to_linear())
    return len(mods)


_MOVED = ("MANIFEST", "WEIGHTS", "FORMAT", "is_lowrank_folder", "read_manifest", "load_lowrank_model")


def __getattr__(name: str):
    """The low-rank folder format moved to :mod:`prunekit.formats.lowrank` (deprecated here)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..formats import lowrank

    return moved(__name__, name, lowrank)
