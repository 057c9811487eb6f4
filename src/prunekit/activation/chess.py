"""CHESS: channel-wise thresholds on the gated MLP, and selective sparsification of attention.

He et al., "CHESS: Optimizing LLM Inference via Channel-Wise Thresholding and Selective
Sparsification" (EMNLP 2024; junhuihe-hjh/CHESS). The importance of intermediate channel ``k``
of ``down(h * up(x))`` is ``|h_k| * E|up_k|`` (its expected contribution); one threshold ``T``
per layer on the importance (its ``s``-quantile on calibration text) becomes a threshold per
channel on the activation, ``t_k = T / E|up_k|`` — channels whose ``up`` output is usually
large keep smaller activations. For attention, CHESS sparsifies only the inputs of q and of the
output projection (one threshold each, the ``s``-quantile), leaving k and v dense (the cached keys
and values stay exact).

Departure: CHESS averages per-sample quantiles; prunekit takes the quantile over all sampled
tokens (the definition of the target), as for TEAL and CATS.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..models import weight_view
from .base import ACTIVATION_METHODS, INPUT, ActivationMethod, Site, quantile_threshold, scaled_threshold
from .cats import gate_site


@ACTIVATION_METHODS.register("chess", help="CHESS: channel-wise gate thresholds + q/o input thresholds")
class Chess(ActivationMethod):
    name = "chess"
    needs_up_mean = True

    def sites(self, block: nn.Module, parts) -> list[Site]:
        out = [gate_site(block, parts, channelwise=True)]
        if parts.attn is not None and parts.attn.layout == "separate":
            for name in (parts.attn.q, parts.attn.o):
                w = weight_view(block.get_submodule(name[len(parts.prefix) + 1:]))
                out.append(Site(name, INPUT, w.shape[1], w.numel()))
        return out

    def thresholds(self, sites: list[Site], samples: dict[str, Tensor], sparsity: float,
                   up_mean: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for s in sites:
            if s.channelwise:
                out[s.name] = channel_thresholds(samples[s.name], up_mean[s.name], sparsity)
            else:
                out[s.name] = quantile_threshold(samples[s.name], sparsity)
        return out


def channel_thresholds(h_abs: Tensor, up_mean: Tensor, sparsity: float) -> Tensor:
    """Per-channel thresholds ``T / E|up_k|``, ``T`` the ``sparsity``-quantile of ``|h| * E|up|``.

    A channel whose ``up`` output is always zero contributes nothing: its threshold is ``inf``.
    """
    return scaled_threshold(h_abs, up_mean, sparsity)
