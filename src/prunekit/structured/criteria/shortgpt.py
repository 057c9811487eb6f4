"""ShortGPT block influence (Men et al., 2024, arXiv:2403.03853, eq. 1).

``BI_i = 1 - E_tokens[cos(x_i, x_{i+1})]`` on the dense model's calibration activations: a block
that barely turns its input is redundant, and the blocks with the lowest BI are removed in one
shot. For the ``ffn`` pattern the same measure is taken across the FFN sub-block alone (output
with vs without the FFN's contribution), the static counterpart of FFN-SkipLLM's skipping.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ...options import option
from ...registry import STRUCTURED
from ..base import BlockCriterion, BlockOptions
from ..cache import cached_scores
from ..passes import block_influence


@dataclass(frozen=True)
class ShortGPTOptions(BlockOptions):
    batch_size: int = option(8, "calibration sequences per forward of the dense pass", lo=1)


@STRUCTURED.register("shortgpt", help="ShortGPT block influence 1 - cos(x_in, x_out); lowest removed (blocks, ffn)")
class ShortGPT(BlockCriterion):
    name = "shortgpt"
    Options = ShortGPTOptions

    def block_scores(self, model: nn.Module, calib_ids: Tensor, kind: str, batch_size: int,
                     candidates: list[int]) -> dict[int, float]:
        tag = f"shortgpt|{kind}"
        bi = cached_scores(model, calib_ids, tag, lambda: {"bi": block_influence(model, calib_ids, kind,
                                                                                    self.opts.batch_size)},
                           self.opts.cache)["bi"]
        return {i: bi[i] for i in candidates}
