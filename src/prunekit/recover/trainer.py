"""The training loop: gradient accumulation, mask keeping, schedule, checkpoints, progress.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` windows, each a
forward/backward of :class:`~prunekit.recover.objectives.Objective` scaled by ``1/grad_accum``;
then pruned gradients are zeroed, the global gradient norm clipped, the optimizer and scheduler
stepped, and pruned weights re-zeroed (:class:`~prunekit.recover.masks.MaskSet`). Every
``checkpoint_every`` steps the full state is written (:mod:`.checkpoint`); a run started with the
same checkpoint folder resumes from it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..calibration import peak_rss_mb
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RecoverConfig
from .data import TrainingText, batch_indices
from .masks import MaskSet
from .objectives import Objective
from .optim import build_optimizer, build_scheduler, export_state, import_state, state_bytes

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """What the progress callback receives after every optimizer step (and validation)."""

    step: int  # optimizer steps done
    total_steps: int
    tokens: int  # training tokens done
    total_tokens: int
    loss: float
    parts: dict[str, float]
    lr: float
    grad_norm: float | None
    seconds: float  # training seconds so far (validation and checkpoints excluded)
    tokens_per_s: float
    eta_s: float
    val: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float  # training time (forward/backward/optimizer), summed over resumed segments
    wall_seconds: float  # this process's wall time in the loop (validation and checkpoints included)
    tokens_per_s: float
    optimizer_state_bytes: int
    resumed_from: int | None
    history: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)


class Trainer:
    """Runs :class:`RecoverConfig`'s optimisation of ``named`` parameters.

    Args:
        objective: the loss (holds student and teacher).
        text: training and validation windows.
        cfg: the settings.
        named: trainable ``(name, parameter)`` pairs, fixed order.
        masks: pruned positions to keep at zero.
        projectable: names GaLore may project.
        checkpoint_dir: where checkpoints go / are resumed from (``None``: none).
        callback: called with a :class:`StepInfo` after every step.
        fingerprint: identifies the student in checkpoints (zeros and parameter count).
    """

    def __init__(self, objective: Objective, text: TrainingText, cfg: RecoverConfig,
                 named: list[tuple[str, nn.Parameter]], masks: MaskSet, projectable: set[str] = frozenset(),
                 checkpoint_dir=None, callback: Callable[[StepInfo], None] | None = None,
                 fingerprint: dict | None = None) -> None:
        self.obj, self.text, self.cfg, self.named, self.masks = objective, text, cfg, named, masks
        self.params = [p for _, p in named]
        self.opt = build_optimizer(named, cfg, projectable)
        self.total = cfg.steps
        self.sched = build_scheduler(self.opt, cfg, self.total)
        self.ckpt_dir, self.callback = checkpoint_dir, callback
        self.fingerprint = fingerprint or {}
        self.device = self.params[0].device
        self.history: list[dict] = []
        self.validation: list[dict] = []
        self.train_seconds = 0.0

    # -- checkpoints -------------------------------------------------------------------------
    def _expect(self) -> dict:
        return {"config": self.cfg.trajectory_fields(), "student": self.fingerprint}

    def _save(self, step: int) -> None:
        t = time.perf_counter()
        save_checkpoint(self.ckpt_dir, {
            **self._expect(), "step": step,
            "params": {n: p.detach().clone() for n, p in self.named},
            "optimizer": export_state(self.opt), "scheduler": self.sched.state_dict(), "rng": rng_state(),
            "history": self.history, "validation": self.validation, "train_seconds": self.train_seconds,
        })
        log.info("checkpoint at step %d written in %.1fs", step, time.perf_counter() - t)

    def _resume(self) -> int:
        payload = load_checkpoint(self.ckpt_dir, self._expect())
        if payload is None:
            return 0
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(payload["params"][n])
        import_state(self.opt, payload["optimizer"])
        self.sched.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"])
        self.history = list(payload["history"])
        self.validation = list(payload["validation"])
        self.train_seconds = float(payload["train_seconds"])
        return int(payload["step"])

    # -- the loop ----------------------------------------------------------------------------
    def validate(self, step: int) -> dict:
        res = {"step": step, **self.obj.evaluate(self.text.val, self.cfg.batch_size)}
        self.validation.append(res)
        log.info("validation at step %d: %s", step, {k: round(v, 4) for k, v in res.items() if isinstance(v, float)})
        return res

    def _one_step(self, step: int) -> tuple[dict, float | None]:
        cfg = self.cfg
        parts: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            idx = batch_indices(step, micro, cfg, self.text.train.shape[0])
            got = self.obj.forward_backward(self.text.train[idx].to(self.device), 1.0 / cfg.grad_accum)
            for k, v in got.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
        self.masks.zero_grads()
        gnorm = None
        if cfg.max_grad_norm is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.masks.zero_weights()
        return parts, gnorm

    def run(self) -> TrainResult:
        """Train to ``cfg.steps`` (resuming if a checkpoint exists) and return what happened."""
        start = self._resume()
        resumed = start if start else None
        t_wall = time.perf_counter()
        self.obj.student.train()
        tps_step = self.cfg.tokens_per_step
        for step in range(start, self.total):
            lr = self.opt.param_groups[0]["lr"]
            t0 = time.perf_counter()
            parts, gnorm = self._one_step(step)
            dt = time.perf_counter() - t0
            self.train_seconds += dt
            done = step + 1
            rec = {"step": done, "lr": lr, "seconds": dt, "grad_norm": gnorm, **parts, "peak_rss_mb": peak_rss_mb()}
            self.history.append(rec)
            val = self.validate(done) if self.cfg.val_every and done % self.cfg.val_every == 0 and done < self.total else None
            tok_s = done * tps_step / self.train_seconds if self.train_seconds else 0.0
            if start:  # after a resume the rate of this segment is the honest one
                seg = sum(h["seconds"] for h in self.history[start:])
                tok_s = (done - start) * tps_step / seg if seg else tok_s
            info = StepInfo(done, self.total, done * tps_step, self.total * tps_step, parts["loss"], parts, lr, gnorm,
                            self.train_seconds, tok_s, (self.total - done) * tps_step / tok_s if tok_s else 0.0, val)
            log.debug("step %d/%d loss %.4f lr %.3g %.1fs", done, self.total, parts["loss"], lr, dt)
            if self.ckpt_dir is not None and self.cfg.checkpoint_every and done % self.cfg.checkpoint_every == 0 \
                    and done < self.total:
                self._save(done)
            if self.callback is not None:
                self.callback(info)
        self.obj.student.eval()
        tokens = self.total * tps_step
        return TrainResult(self.total, tokens, self.train_seconds, time.perf_counter() - t_wall,
                           tokens / self.train_seconds if self.train_seconds else 0.0, state_bytes(self.opt),
                           resumed, self.history, self.validation)
