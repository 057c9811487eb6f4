"""Keeping the compression during training: masks from the student's zeros, enforced every step.

PROTOCOLS.md, "Recovery after compression": after every optimizer step ``W <- W * M``, and the
gradients and optimizer state at pruned positions are zero. A mask is taken from every decoder
linear whose weight has exact zeros (unstructured, N:M, anything the pruning left); the *same
positions* stay zero, so an N:M layer stays N:M and the sparsity is identical before and after.
Linears without zeros (dense, the smaller linears of structured pruning, the two factors of a
low-rank module) carry no mask and train as they are — their shapes never change.

With the gradient zero at a pruned position, Adam's moments there stay exactly zero and its
update ``m / (sqrt(v) + eps)`` is exactly zero, so masking the gradient alone keeps AdamW/SPAM
exact; the weights are still re-masked after every step because GaLore's projected-back update
(``P @ N``) is dense.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models import decoder_linears, weight_view

log = logging.getLogger(__name__)


@dataclass
class MaskSet:
    """Pruned positions (``True`` = must stay zero) of each masked weight, keyed by layer name.

    ``params[name]`` is the weight ``nn.Parameter`` itself (its identity survives LoRA
    injection, which only wraps the module), ``pruned[name]`` a bool tensor in the parameter's
    own layout.
    """

    params: dict[str, nn.Parameter] = field(default_factory=dict)
    pruned: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def capture(cls, model: nn.Module) -> "MaskSet":
        """Masks from the exact zeros of every decoder linear of ``model``.

        LoRA adapter matrices (``lora_B`` starts at zero) are never masked: only base weights.
        """
        out = cls()
        for name, mod in decoder_linears(model).items():
            if ".lora_" in name:
                continue
            w = mod.weight
            zeros = w.detach() == 0
            if bool(zeros.any()):
                out.params[name] = w
                out.pruned[name] = zeros
        log.info("masks: %d of %d decoder linears have pruned positions (%.4f of their weights)",
                 len(out.pruned), len(decoder_linears(model)), out.density_pruned())
        return out

    def __len__(self) -> int:
        return len(self.pruned)

    def density_pruned(self) -> float:
        total = sum(m.numel() for m in self.pruned.values())
        return sum(int(m.sum()) for m in self.pruned.values()) / total if total else 0.0

    def bytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.pruned.values())

    def for_param(self, p: Tensor) -> Tensor | None:
        """The pruned mask of parameter ``p`` (by identity), if it has one."""
        for name, q in self.params.items():
            if q is p:
                return self.pruned[name]
        return None

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Gradients at pruned positions <- 0 (before the optimizer step)."""
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.masked_fill_(self.pruned[name], 0)

    @torch.no_grad()
    def zero_weights(self) -> None:
        """``W <- W * M`` (after the optimizer step)."""
        for name, p in self.params.items():
            p.masked_fill_(self.pruned[name], 0)

    @torch.no_grad()
    def zero_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer-state tensors shaped like a masked weight <- 0 at its pruned positions.

        Projected states (GaLore's ``r x n`` moments) have no per-weight positions and are left as
        they are.
        """
        for name, p in self.params.items():
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, Tensor) and v.shape == p.shape:
                    v.masked_fill_(self.pruned[name], 0)

    def violations(self) -> dict[str, int]:
        """Layer name -> number of pruned positions that are no longer zero (empty: all kept)."""
        bad = {}
        for name, p in self.params.items():
            n = int((p.detach()[self.pruned[name]] != 0).sum())
            if n:
                bad[name] = n
        return bad


def sparsity_stats(model: nn.Module) -> dict:
    """Zeros over the decoder linears' weights (how prunekit counts sparsity), with the total."""
    zeros = total = 0
    for mod in decoder_linears(model).values():
        w = weight_view(mod)
        zeros += int((w == 0).sum())
        total += w.numel()
    return {"zeros": zeros, "params": total, "sparsity": zeros / total if total else 0.0}
