"""TEAL: training-free magnitude thresholds on the input of every linear.

Liu et al., "Training-Free Activation Sparsity in Large Language Models" (ICLR 2025;
FasterDecoding/TEAL). Every linear ``y = W x`` of every decoder block gets its input thresholded,
``x_i -> x_i * [|x_i| > t]``, with ``t`` the ``s``-quantile of ``|x|`` on calibration text, so a
fraction ``s`` of the input channels is zero and a kernel can skip those columns of ``W``. The
per-linear sparsities are uniform, or TEAL's block-wise greedy allocation
(:mod:`.greedy`): each step raises the sparsity of the one linear whose step hurts the block's
output least, until the parameter-weighted mean reaches the target.

Linears fed the same tensor (q/k/v, gate/up) are sampled once but keep their own thresholds (the
greedy search may give them different sparsities, as TEAL's does).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..models import block_linears, weight_view
from .base import ACTIVATION_METHODS, INPUT, ActivationMethod, Site, quantile_threshold


@ACTIVATION_METHODS.register("teal", help="TEAL: magnitude threshold on the input of every decoder linear")
class Teal(ActivationMethod):
    name = "teal"
    supports_greedy = True

    def sites(self, block: nn.Module, parts) -> list[Site]:
        return [Site(name, INPUT, weight_view(m).shape[1], weight_view(m).numel())
                for name, m in block_linears(block, parts.prefix).items()]

    def thresholds(self, sites: list[Site], samples: dict[str, Tensor], sparsity: float,
                   up_mean: dict[str, Tensor]) -> dict[str, Tensor]:
        return {s.name: quantile_threshold(samples[s.name], sparsity) for s in sites}
