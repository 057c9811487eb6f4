"""CATS: one threshold on the gate activation of every gated MLP.

Lee et al., "CATS: Contextually-Aware Thresholding for Sparsity in Large Language Models" (COLM
2024). In ``down(act(gate(x)) * up(x))`` the activation ``h = act(gate(x))`` is thresholded,
``h_k -> h_k * [|h_k| > t]``, with ``t`` the ``s``-quantile of ``|h|`` on calibration text (one
per layer). A zero channel ``k`` needs neither row ``k`` of ``up_proj`` nor column ``k`` of
``down_proj``; ``gate_proj`` is still computed densely. Attention is left dense.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..models import weight_view
from ..models.activation import gated_mlp
from .base import ACTIVATION_METHODS, GATE, ActivationMethod, Site, quantile_threshold


def gate_site(block: nn.Module, parts, channelwise: bool = False) -> Site:
    """The gated MLP of one block as a ``gate`` site (a ConfigError if the block has none)."""
    name = parts.ffn.module if parts.ffn is not None else f"{parts.prefix}.mlp"
    mlp = gated_mlp(block, name[len(parts.prefix) + 1:], name)
    skipped = weight_view(mlp.up_proj).numel() + weight_view(mlp.down_proj).numel()
    return Site(name, GATE, weight_view(mlp.up_proj).shape[0], skipped, channelwise)


@ACTIVATION_METHODS.register("cats", help="CATS: threshold on the gated MLP's activation (up/down skip zero channels)")
class Cats(ActivationMethod):
    name = "cats"

    def sites(self, block: nn.Module, parts) -> list[Site]:
        return [gate_site(block, parts)]

    def thresholds(self, sites: list[Site], samples: dict[str, Tensor], sparsity: float,
                   up_mean: dict[str, Tensor]) -> dict[str, Tensor]:
        return {s.name: quantile_threshold(samples[s.name], sparsity) for s in sites}
