"""Training objectives: distillation from the dense teacher, next-token loss, hidden-state matching.

* Distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"; the logit
  KD used by Minitron, Sreenivas et al. 2024): ``L_KD = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``
  per position, averaged over every position of every window. ``T^2`` keeps the gradient scale
  independent of the temperature.
* Next-token cross-entropy on the training text (what LoRA recovery in Wanda/LLM-Pruner uses).
* Hidden-state matching: mean squared error between the student's and the teacher's hidden
  states at chosen layers (Minitron's intermediate-state loss, without a learned projection, so
  the hidden sizes must agree).

The total is ``kl_weight * L_KD + ce_weight * L_CE + hidden_weight * L_hidden``.

Full-vocabulary logits are never held for a whole window. The model is split into its trunk
(everything up to the final hidden state) and its head (the LM head); the trunk runs once, its
output is detached, and the head + loss run ``loss_chunk`` positions at a time, each chunk's
backward accumulating the gradient of the hidden state; one backward through the trunk follows.
Same FLOPs as the plain loss, but the logits memory is ``loss_chunk x vocab`` instead of
``batch x seqlen x vocab`` (for the student, its gradient and the teacher alike). The split is
verified once against the model's own logits; a model whose head is not a plain function of the
last hidden state (logit soft-capping, scaling) falls back to full logits.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .config import RecoverConfig

log = logging.getLogger(__name__)


def kl_sum(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * sum_positions KL(p_t || p_s)`` with ``p = softmax(z / T)``, computed in float32.

    Exactly zero when the two logit tensors are equal (``p_t * (log p_t - log p_s)`` with equal
    log-probabilities is ``p_t * 0``).
    """
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(ls, lt, log_target=True, reduction="sum") * temperature**2


def ce_sum(student_logits: Tensor, targets: Tensor) -> Tensor:
    """Summed next-token cross-entropy (targets ``-100`` are ignored), in float32."""
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


def shifted_targets(ids: Tensor) -> Tensor:
    """``[B, T]`` targets: position ``t`` predicts ``ids[:, t + 1]``; the last position has none (-100)."""
    out = torch.full_like(ids, -100)
    out[:, :-1] = ids[:, 1:]
    return out


@dataclass
class HeadSplit:
    """A causal LM as ``logits = head(trunk(ids).last_hidden_state)``."""

    trunk: nn.Module
    head: nn.Module


def split_model(model: nn.Module) -> HeadSplit | None:
    """The trunk/head split of ``model``, verified against its own logits on a short input."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    trunk = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if head is None or not isinstance(trunk, nn.Module) or trunk is model:
        return None
    vocab = head.weight.shape[0]
    ids = (torch.arange(8) * 7919 % vocab).unsqueeze(0).to(head.weight.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits
            mine = head(trunk(input_ids=ids, use_cache=False).last_hidden_state)
    finally:
        model.train(was_training)
    tol = 1e-4 if full.dtype == torch.float32 else 2e-2
    if full.shape != mine.shape or not torch.allclose(full.float(), mine.float(), rtol=tol, atol=tol):
        log.warning("%s: logits are not lm_head(last hidden state) (soft-capping or scaling?); the loss falls "
                    "back to full logits per window (more memory)", type(model).__name__)
        return None
    return HeadSplit(trunk, head)


class Objective:
    """The configured loss, with a memory-bounded forward/backward (see the module docstring).

    Args:
        cfg: weights, temperature, hidden layers, chunk size, bf16 autocast.
        student: the model being trained.
        teacher: the dense model (``None`` when no objective needs it); it only ever runs under
            ``torch.inference_mode``.
    """

    def __init__(self, cfg: RecoverConfig, student: nn.Module, teacher: nn.Module | None) -> None:
        self.cfg = cfg
        self.student, self.teacher = student, teacher if cfg.needs_teacher else None
        self.s_split = split_model(student)
        self.t_split = split_model(self.teacher) if self.teacher is not None else None
        self.chunked = self.s_split is not None and (self.teacher is None or self.t_split is not None)
        self.need_hidden = cfg.hidden_weight > 0

    # -- pieces -----------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        dev = next(self.student.parameters()).device.type
        return torch.autocast(dev, dtype=torch.bfloat16)

    def _trunk(self, split: HeadSplit | None, model: nn.Module, ids: Tensor):
        kw = {"output_hidden_states": True} if self.need_hidden else {}
        if split is not None:
            return split.trunk(input_ids=ids, use_cache=False, **kw)
        return model(input_ids=ids, use_cache=False, **kw)

    def _hidden(self, out) -> list[Tensor]:
        hs = out.hidden_states
        try:
            return [hs[i] for i in self.cfg.hidden_layers]
        except IndexError:
            raise ConfigError(f"hidden_layers={list(self.cfg.hidden_layers)} is out of range: the model has "
                              f"{len(hs)} hidden states (embeddings + one per block)") from None

    def teacher_forward(self, ids: Tensor) -> tuple[Tensor | None, list[Tensor]]:
        """Teacher's last hidden state (or logits, unsplit) and matched hidden states.

        Computed under ``inference_mode`` and cloned out of it (inference tensors cannot join the
        student's autograd graph); only ``[B, T, hidden]`` tensors are kept, never logits, when
        the head split holds.
        """
        if self.teacher is None:
            return None, []
        with torch.inference_mode():
            out = self._trunk(self.t_split, self.teacher, ids)
            main = out.last_hidden_state if self.t_split is not None else out.logits
            hidden = self._hidden(out) if self.need_hidden else []
        return main.clone(), [h.clone() for h in hidden]

    def _teacher_logits(self, t_main: Tensor, rows: slice) -> Tensor:
        if self.t_split is None:
            return t_main.reshape(-1, t_main.shape[-1])[rows]
        with torch.no_grad():
            return self.t_split.head(t_main.reshape(-1, t_main.shape[-1])[rows])

    def _chunk_loss(self, zs: Tensor, zt: Tensor | None, targets: Tensor, n_kl: int, n_ce: int) -> tuple[Tensor, dict]:
        cfg, parts = self.cfg, {}
        total = zs.new_zeros((), dtype=torch.float32)
        if cfg.kl_weight > 0:
            kl = kl_sum(zs, zt, cfg.temperature) / n_kl
            total = total + cfg.kl_weight * kl
            parts["kl"] = kl.item()
        if cfg.ce_weight > 0:
            ce = ce_sum(zs, targets) / n_ce
            total = total + cfg.ce_weight * ce
            parts["ce"] = ce.item()
        return total, parts

    def _hidden_loss(self, s_hidden: list[Tensor], t_hidden: list[Tensor]) -> Tensor:
        losses = []
        for s, t in zip(s_hidden, t_hidden):
            if s.shape != t.shape:
                raise ConfigError(f"hidden-state matching needs equal shapes, got student {tuple(s.shape)} vs "
                                  f"teacher {tuple(t.shape)}; set hidden_weight=0 for this student")
            losses.append(F.mse_loss(s.float(), t.float()))
        return torch.stack(losses).mean()

    # -- training ---------------------------------------------------------------------------
    def forward_backward(self, ids: Tensor, weight: float = 1.0) -> dict[str, float]:
        """Accumulate ``weight * loss`` gradients for one micro-batch; returns the loss parts."""
        t_main, t_hidden = self.teacher_forward(ids)
        targets = shifted_targets(ids).reshape(-1)
        n_kl, n_ce = ids.numel(), ids.shape[0] * (ids.shape[1] - 1)
        sums: dict[str, float] = {}
        with self._autocast():
            out = self._trunk(self.s_split if self.chunked else None, self.student, ids)
        main = out.last_hidden_state if self.chunked else out.logits
        leaf = main.detach().requires_grad_(True) if self.chunked else main
        flat = leaf.reshape(-1, leaf.shape[-1])
        step = self.cfg.loss_chunk if self.chunked else flat.shape[0]
        loss_total = 0.0
        full_loss = None
        for a in range(0, flat.shape[0], step):
            rows = slice(a, min(a + step, flat.shape[0]))
            with self._autocast():
                zs = self.s_split.head(flat[rows]) if self.chunked else flat[rows]
            zt = self._teacher_logits(t_main, rows) if t_main is not None else None
            loss, parts = self._chunk_loss(zs, zt, targets[rows], n_kl, n_ce)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            loss_total += loss.item()
            if self.chunked:
                (loss * weight).backward()
            else:
                full_loss = loss if full_loss is None else full_loss + loss
        roots, grads = [], []
        if self.chunked:
            roots.append(main)
            grads.append(leaf.grad)
        else:
            roots.append(full_loss * weight)
            grads.append(None)
        if self.need_hidden:
            hl = self._hidden_loss(self._hidden(out), t_hidden)
            sums["hidden"] = hl.item()
            loss_total += self.cfg.hidden_weight * hl.item()
            roots.append(hl * (self.cfg.hidden_weight * weight))
            grads.append(None)
        torch.autograd.backward(roots, grads)
        sums["loss"] = loss_total
        return sums

    # -- validation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, windows: Tensor, batch_size: int = 1) -> dict[str, float]:
        """Mean next-token CE (and its perplexity) and mean distillation KL on ``windows``.

        The student runs in float32 eval mode here (no autocast): validation numbers do not
        depend on the training precision.
        """
        was = self.student.training
        self.student.eval()
        ce_tot = kl_tot = 0.0
        n_ce = n_kl = 0
        try:
            for a in range(0, windows.shape[0], batch_size):
                ids = windows[a : a + batch_size].to(next(self.student.parameters()).device)
                t_main, _ = self.teacher_forward(ids) if self.cfg.kl_weight > 0 else (None, [])
                out = self._trunk(self.s_split, self.student, ids)
                flat = (out.last_hidden_state if self.s_split is not None else out.logits)
                flat = flat.reshape(-1, flat.shape[-1])
                targets = shifted_targets(ids).reshape(-1)
                for c in range(0, flat.shape[0], self.cfg.loss_chunk):
                    rows = slice(c, min(c + self.cfg.loss_chunk, flat.shape[0]))
                    zs = self.s_split.head(flat[rows]) if self.s_split is not None else flat[rows]
                    ce_tot += float(ce_sum(zs, targets[rows]))
                    if t_main is not None:
                        kl_tot += float(kl_sum(zs, self._teacher_logits(t_main, rows), self.cfg.temperature))
                n_ce += ids.shape[0] * (ids.shape[1] - 1)
                n_kl += ids.numel()
        finally:
            self.student.train(was)
        ce = ce_tot / n_ce
        res = {"ce": ce, "ppl": math.exp(ce) if ce < 700 else float("inf"), "tokens": n_ce}
        if self.cfg.kl_weight > 0:
            res["kl"] = kl_tot / n_kl
        return res
