"""Measured removal cost: the calibration perplexity with one block (or one FFN) removed.

For every candidate, the next-token loss of the calibration text with that block skipped (or its
FFN's contribution zeroed) is measured on the dense model; the blocks whose removal raises it
least go first (the "perplexity" importance ShortGPT and LLM-Streamline compare against). Only
calibration text is used, never an evaluation split. It costs about half a forward of the
calibration subset per candidate (activations before the candidate are reused), so it uses the
first ``nsamples`` calibration sequences.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch import Tensor, nn

from ...options import Options, option
from ...registry import STRUCTURED
from ..base import BlockCriterion, BlockOptions
from ..cache import cached_scores
from ..passes import removal_nll

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPLOptions(BlockOptions):
    nsamples: int = option(8, "calibration sequences measured (the first ones of the calibration set)", lo=1)


@STRUCTURED.register("ppl", help="calibration perplexity with each block (or FFN) removed; smallest rise removed")
class RemovalPPL(BlockCriterion):
    name = "ppl"
    Options = PPLOptions

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        self.info: dict = {}

    def block_scores(self, model: nn.Module, calib_ids: Tensor, kind: str, batch_size: int,
                     candidates: list[int]) -> dict[int, float]:
        ids = calib_ids[: self.opts.nsamples]

        def compute() -> dict:
            dense, nll = removal_nll(model, ids, kind, candidates,
                                     lambda k, n: log.info("removal perplexity: %d/%d candidates", k, n))
            return {"dense": dense, "nll": sorted(nll.items())}

        got = cached_scores(model, ids, f"ppl|{kind}|{sorted(candidates)}", compute, self.opts.cache)
        nll = {int(i): v for i, v in got["nll"]}
        self.info = {"dense_ppl": math.exp(got["dense"]), "nsamples": int(ids.shape[0]),
                     "ppl": {i: math.exp(v) for i, v in nll.items()}}
        return {i: math.exp(v) - math.exp(got["dense"]) for i, v in nll.items()}
