"""Block reconstruction: after a block is pruned, fit its remaining weights to the dense block's outputs.

"A free lunch in LLM compression" (Zimmer, Roux, Wagner, Pokutta 2025, arXiv:2510.14444; reference
code ZIB-IOL/Free-Lunch-in-LLM-Compression): after pruning a decoder block, train what is left of
it — masks fixed — so that its outputs on the calibration inputs match the dense model's, one
block at a time; quality close to full retraining at a fraction of the memory and compute. Two
stages here:

1. **per-linear least squares** (:func:`~prunekit.methods.lstsq.masked_lstsq`, in
   :meth:`Reconstruct.refine`): each pruned linear's kept weights refit to the dense linear's
   outputs on its recorded inputs, ``min ||(W' - W) X||`` on the support — a convex warm start
   (SparseGPT's reconstruction made exact for the mask it ended with);
2. **block-output MSE** (:func:`~prunekit.methods.blockfit.fit_block`, in
   :meth:`Reconstruct.refine_block`): AdamW on the whole block (the reference's BlockOnlyFullFT:
   masked weights, norms, biases), MSE to the targets, 3 passes over the calibration batches in
   micro-batches of 2 sequences, linear warm-up (10 %) and decay, mixed precision (the reference's
   fp16 autocast on CUDA; ``amp="auto"``: bf16 where the device computes it fast, float32 on a CPU
   without AVX-512 BF16 / AMX — there torch's bf16 backward falls back to generic loops, 17x slower).

Which activations (``inputs`` / ``target``): the reference trains each block on the *dense*
model's inputs to it towards the dense model's outputs (``propagate_sparse_activations_reconstruct
= False``, its default: every block learns the dense map) — ``inputs="dense"``. Training on the
*compressed* model's inputs instead (``inputs="pruned"``) lets a block also correct the error its
pruned predecessors left: towards the dense model's activations (``target="dense"``, the reference's
``use_dense_targets``) or towards the dense block's output on those same inputs (``target="local"``,
no second stream needed). The default is the reference's; docs/one_shot.md says what is measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError
from ..models import is_linear, weight_view
from ..models.linear import is_conv1d
from ..options import Options, option
from ..registry import REFINERS
from .base import InputStats, Target
from .blockfit import FitSettings, fit_block
from .blockstep import BlockData, BlockNeeds
from .lstsq import masked_lstsq
from .maskfit import MaskRule, rule_for
from .refine import Refiner, skip_matcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructOptions(Options):
    """Defaults: the free-lunch reference's (ZIB-IOL), except the learning rate: 3e-4, chosen on
    WikiText-2 validation (docs/one_shot.md)."""

    lstsq: bool = option(True, "refit each pruned linear's kept weights by least squares before the block fit")
    lstsq_iters: int = option(30, "conjugate-gradient iterations of the per-linear least squares", lo=1)
    percdamp: float = option(0.01, "least-squares damping, a fraction of mean(diag X^T X)", lo=0.0, hi=10.0)
    epochs: int = option(3, "passes over the calibration batches of the block fit (0: least squares only)", lo=0)
    lr: float = option(3e-4, "AdamW learning rate of the block fit (linear warm-up 10 %, linear decay)", lo=0.0,
                       lo_open=True, hi=1.0)
    micro_batch: int = option(2, "sequences per optimizer step", lo=1)
    inputs: str = option("dense", "train on the dense model's inputs to the block (reference) or the compressed "
                         "model's", choices=("dense", "pruned"))
    target: str = option("dense", "fit to the dense model's outputs of the block, or to the dense block on the "
                         "same inputs (local)", choices=("dense", "local"))
    train: str = option("all", "what the block fit trains: every block parameter (reference) or the pruned "
                        "linears' weights", choices=("all", "linears"))
    amp: str = option("auto", "mixed precision of the block fit (auto: bf16 where the device computes it fast, "
                      "else fp16 on CUDA, float32 on a CPU without bf16 instructions)",
                      choices=("auto", "none", "bf16", "fp16"))
    skip: str = option("", "regex on qualified names whose least squares is skipped (empty = none)")
    mask: str = option("fixed", "the block fit's masks: held as the method left them, or learned (straight-through: "
                       "pruned weights may come back, each row / N:M group keeps its count)",
                       choices=("fixed", "learned"))
    mask_every: int = option(1, "with mask=learned: optimizer steps between mask re-selections", lo=1)
    mask_decay: float = option(0.0, "with mask=learned: SR-STE's pull of the pruned weights' shadows to zero "
                               "(added to their gradient)", lo=0.0, hi=1.0)
    holdout: int = option(0, "calibration sequences (the last ones) kept out of the block fit to measure it: the "
                          "block report gives their MSE before / after, and a fit that raised it is undone", lo=0)

    def validate(self) -> None:
        skip_matcher(self.skip)
        if self.mask == "learned" and self.epochs == 0:
            raise ConfigError("mask='learned' moves masks during the block fit, which epochs=0 skips: set epochs >= 1 "
                              "or mask='fixed'")


@REFINERS.register("reconstruct", help="block reconstruction: per-linear least squares, then block-output MSE "
                                       "to the dense model with the masks held (free lunch, 2025)")
class Reconstruct(Refiner):
    """Block reconstruction (options: :class:`ReconstructOptions`)."""

    name = "reconstruct"
    Options = ReconstructOptions
    needs_moments = False
    needs_hessian = True
    structured = True

    @classmethod
    def structured_refusal(cls, options) -> str | None:
        if dict(options).get("mask", "fixed") != "fixed":
            return (f"refine option mask={dict(options)['mask']!r} moves single weights, which would break the removed "
                    "units: drop the mask option (the fit keeps the structure)")
        return None

    def __init__(self, options: ReconstructOptions | None = None) -> None:
        super().__init__(options)
        self._skip = skip_matcher(self.opts.skip)
        self._rules: dict[str, tuple] = {}  # name -> (pattern, input norms) for mask="learned"

    def refine(self, name: str, linear: nn.Module, dense: Tensor, stats: InputStats, target: Target) -> dict[str, Any]:
        o = self.opts
        if o.mask == "learned":  # structured patterns: refused before any work (structured_refusal)
            if stats is None or stats.samples == 0:
                raise RuntimeError(f"reconstruct: {name} saw no calibration input")
            self._rules[name] = (target.pattern, stats.col_norm)
        if not o.lstsq or (self._skip is not None and self._skip.search(name)):
            return {"lstsq": "skipped"}
        if stats is None or stats.count == 0 or stats.xtx is None:
            raise RuntimeError(f"reconstruct: {name} saw no calibration input")
        w = weight_view(linear)
        keep = w != 0
        new, info = masked_lstsq(dense, w.float(), stats.hessian(), keep, o.lstsq_iters, percdamp=o.percdamp)
        if info["error_after"] <= info["error_before"]:  # CG from the current point: never worse in exact arithmetic
            w.copy_(new.to(w.dtype))
        else:
            info["kept_previous"] = True
        return {"lstsq": info}

    def block_needs(self) -> BlockNeeds | None:
        o = self.opts
        if o.epochs == 0:
            return None
        stream = o.inputs == "dense" or o.target == "dense"
        return BlockNeeds(dense_stream=stream, local_targets=not stream)

    def refine_block(self, data: BlockData) -> dict[str, Any]:
        o = self.opts
        if o.inputs == "dense":
            inputs, targets = data.dense_inputs, data.dense_outputs
        else:
            inputs = data.inputs
            targets = data.dense_outputs if o.target == "dense" else data.local_targets
        params, zeros, held = _trainable(data.block, data.modules, o.train)
        settings = FitSettings(o.epochs, o.lr, o.micro_batch, 0.1, o.amp, o.holdout, o.mask_every, o.mask_decay)
        rules = self._block_rules(data.modules) if o.mask == "learned" else None
        info = fit_block(data.run, inputs, targets, params, zeros, held, settings, rules)  # holdout checked already
        if not info.get("finite", True):
            log.warning("reconstruct: block %d's fit produced a non-finite loss; lower --refine-option lr", data.index)
        if info.get("reverted"):
            log.warning("reconstruct: block %d's fit raised the held-out MSE (%.4g -> %.4g); kept the weights from "
                        "before it", data.index, info["heldout_before"], info["heldout_after"])
        return {"name": self.name, "mask": o.mask, "inputs": o.inputs,
                "target": o.target if o.inputs == "pruned" else "dense", "params": sum(p.numel() for p in params),
                **info}

    def _block_rules(self, modules: dict[str, nn.Module]) -> dict[nn.Parameter, MaskRule]:
        """The mask rules of the block's pruned linears (recorded by :meth:`refine`), keyed by their weights."""
        rules = {}
        for name, mod in modules.items():
            if is_linear(mod) and name in self._rules:
                pattern, norm = self._rules.pop(name)
                rules[mod.weight] = rule_for(weight_view(mod), pattern, norm, transposed=is_conv1d(mod))
        return rules


def _trainable(block: nn.Module, modules: dict[str, nn.Module], what: str):
    """``(params, zeros, held)`` for :func:`fit_block`: the pruned linears' weights with their zero masks
    (and their biases, held where a whole row is pruned); with ``what="all"`` every other floating
    parameter of the block too (norms, biases, linears left dense)."""
    zeros: dict[nn.Parameter, Tensor] = {}
    held: dict[nn.Parameter, Tensor] = {}
    params: list[nn.Parameter] = []
    for mod in modules.values():
        if not is_linear(mod):  # a replacement (low-rank factors): trained as is with what="all"
            continue
        w = mod.weight
        zeros[w] = w.data == 0
        params.append(w)
        bias = getattr(mod, "bias", None)
        if isinstance(bias, nn.Parameter):
            held[bias] = (weight_view(mod) == 0).all(dim=1)  # an output whose weights are all pruned keeps its bias
            params.append(bias)
    if what == "all":
        seen = {id(p) for p in params}
        params += [p for p in block.parameters() if id(p) not in seen and p.is_floating_point()]
    return params, zeros, held
