"""WINA: weight-informed thresholds on the input of every linear.

Chen et al., "WINA: Weight Informed Neuron Activation for Accelerating Large Language Model
Inference" (2025; microsoft/wina). TEAL zeroes input channel ``i`` of ``y = W x`` when ``|x_i|`` is
small; WINA when its contribution to the output is small, ``|x_i| * ||W[:, i]||_2`` (the column's
l2 norm). One threshold ``T`` per linear on that score (its ``s``-quantile on calibration text)
becomes one threshold per input channel on the activation, ``t_i = T / ||W[:, i]||`` — the same
mask, so the same kernel skips the same contiguous rows of ``W^T``. Allocation: uniform, or TEAL's
greedy search on the scores.

Departures: the reference code (``wina/self_attn.py``, ``wina/mlp.py``) weights only the k and gate
inputs by their column norms (q, v, up, o and down keep TEAL's ``|x|``) and first rotates the
residual stream so those matrices have orthogonal columns (``--transform``: SliceGPT-style
rotations with an extra ``d x d`` shortcut matmul per residual add, read on every decoded token).
prunekit weights every linear's input by its own column norms and leaves the weights as they
are (no rotation: nothing extra to read at decode). Linears fed the same tensor (q/k/v, gate/up)
therefore get different masks, as under TEAL's greedy allocation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import block_linears, weight_view
from .base import ACTIVATION_METHODS, INPUT, ActivationMethod, Site, scaled_threshold


@ACTIVATION_METHODS.register("wina", help="WINA: |x| times the weight column's norm, thresholded at every linear's input")
class Wina(ActivationMethod):
    name = "wina"
    supports_greedy = True

    def __init__(self) -> None:
        self.norms: dict[str, Tensor] = {}

    def sites(self, block: nn.Module, parts) -> list[Site]:
        out = []
        for name, m in block_linears(block, parts.prefix).items():
            w = weight_view(m)
            self.norms[name] = torch.linalg.vector_norm(w.float(), dim=0)
            out.append(Site(name, INPUT, w.shape[1], w.numel(), channelwise=True))
        return out

    def channel_scale(self, name: str) -> Tensor:
        return self.norms[name]

    def thresholds(self, sites: list[Site], samples: dict[str, Tensor], sparsity: float,
                   up_mean: dict[str, Tensor]) -> dict[str, Tensor]:
        return {s.name: scaled_threshold(samples[s.name], self.norms[s.name], sparsity) for s in sites}
