"""Optimizers (AdamW, GaLore, SPAM), the learning-rate schedule and optimizer-state accounting.

* **AdamW** (Loshchilov & Hutter 2019): ``torch.optim.AdamW``, the baseline; state ``2 x params``.
* **GaLore** (Zhao et al., ICML 2024, arXiv:2403.03507), from the authors' package
  ``galore-torch``: for a weight gradient ``G`` (m x n) every ``T`` steps take the top-``r``
  singular vectors of ``G`` as the projector ``P`` (of the smaller side), run Adam on the
  projected gradient ``R = P^T G`` (r x n) and apply ``W -= lr * alpha * P @ Adam(R)``; the Adam
  state shrinks from ``2mn`` to ``2rn`` (plus ``P``). Applied to the 2-D weights of the decoder
  linears whose smaller side exceeds ``r``; everything else gets plain Adam in the same optimizer.
  With a pruning mask the gradient is masked before the projection and the (dense) update is
  masked after the step (:mod:`.masks`).
* **SPAM** (Huang et al., ICLR 2025): ours, :mod:`.spam`.

Weight decay applies to matrices only (never to norms or biases), as usual for transformers.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .config import RecoverConfig
from .spam import SPAM

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_bitsandbytes():
    """galore-torch imports bitsandbytes (for its 8-bit variant we do not use), which warns about
    missing optional CPU kernels at import; keep that out of the user's terminal."""
    lg = logging.getLogger("bitsandbytes")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def import_galore():
    """``galore_torch.GaLoreAdamW`` and its projector class, or a ConfigError saying how to install it."""
    try:
        with _quiet_bitsandbytes():
            from galore_torch import GaLoreAdamW
            from galore_torch.galore_projector import GaLoreProjector
    except ImportError as e:
        raise ConfigError(f"optimizer 'galore' needs the galore-torch package ({e}); install it with "
                          "pip install 'prunekit[recover]' or pip install galore-torch") from None
    return GaLoreAdamW, GaLoreProjector


def param_groups(named: Iterable[tuple[str, nn.Parameter]], cfg: RecoverConfig,
                 galore_names: set[str] = frozenset()) -> list[dict]:
    """Decayed matrices, undecayed vectors, and (GaLore) projected matrices as separate groups."""
    decay, no_decay, projected = [], [], []
    for name, p in named:
        if name in galore_names:
            projected.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if projected:
        groups.append({"params": projected, "weight_decay": cfg.weight_decay, "rank": cfg.galore_rank,
                       "update_proj_gap": cfg.galore_update_gap, "scale": cfg.galore_scale, "proj_type": "std"})
    return [g for g in groups if g["params"]]


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: RecoverConfig,
                    projectable: set[str] = frozenset()) -> torch.optim.Optimizer:
    """The configured optimizer over ``named`` trainable parameters.

    Args:
        named: ``(name, parameter)`` pairs, in a fixed order (checkpoints rely on it).
        cfg: optimizer settings.
        projectable: names GaLore may project (the decoder linears' weights); ignored otherwise.
    """
    if not named:
        raise ConfigError("nothing to train: no parameter requires a gradient")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)
    if cfg.optimizer == "spam":
        return SPAM(param_groups(named, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                    threshold=cfg.spam_threshold, reset_interval=cfg.spam_reset_interval,
                    warmup_steps=cfg.spam_warmup, clip_delay=cfg.spam_clip_delay)
    galore_cls, _ = import_galore()
    proj = {n for n, p in named if n in projectable and p.dim() == 2 and min(p.shape) > cfg.galore_rank}
    if not proj:
        raise ConfigError(f"galore_rank={cfg.galore_rank} is not below the smaller side of any trainable weight; "
                          "lower --galore-rank")
    log.info("GaLore: rank %d projection on %d of %d trainable tensors (update gap %d, scale %g)", cfg.galore_rank,
             len(proj), len(named), cfg.galore_update_gap, cfg.galore_scale)
    return galore_cls(param_groups(named, cfg, proj), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                      no_deprecation_warning=True)


def lr_lambda(cfg: RecoverConfig, total_steps: int):
    """Multiplier of ``lr`` at step ``s``: linear warm-up, then cosine/linear/constant decay to ``min_lr_ratio``."""
    warm = int(round(cfg.warmup_ratio * total_steps))
    lo = cfg.min_lr_ratio

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if cfg.schedule == "constant" or total_steps <= warm + 1:
            return 1.0
        x = (s - warm) / (total_steps - warm - 1)
        x = min(max(x, 0.0), 1.0)
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - lo) * x
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * x))

    return f


def build_scheduler(opt: torch.optim.Optimizer, cfg: RecoverConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))


def _state_tensors(value: Any) -> list[Tensor]:
    """Every tensor inside one optimizer-state entry (GaLore's projector object included)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _state_tensors(v)]
    mat = getattr(value, "ortho_matrix", None)
    return _state_tensors(mat) if mat is not None else []


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (moments, projectors), step counters excluded."""
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if k == "step":
                continue
            total += sum(t.numel() * t.element_size() for t in _state_tensors(v))
    return total


def export_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with GaLore's projector objects turned into plain tensors (so the
    checkpoint loads with ``torch.load(weights_only=True)``)."""
    sd = opt.state_dict()
    state = {}
    for idx, st in sd["state"].items():
        st = dict(st)
        proj = st.pop("projector", None)
        if proj is not None:
            mat = proj.ortho_matrix
            st["projector_matrix"] = list(mat) if isinstance(mat, (list, tuple)) else mat
            st["projector_meta"] = {"rank": proj.rank, "update_proj_gap": proj.update_proj_gap, "scale": proj.scale,
                                    "proj_type": proj.proj_type}
        state[idx] = st
    return {"state": state, "param_groups": sd["param_groups"]}


def import_state(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Inverse of :func:`export_state`."""
    state = {}
    projectors = {}
    for idx, st in sd["state"].items():
        st = dict(st)
        if "projector_matrix" in st:
            projectors[idx] = (st.pop("projector_matrix"), st.pop("projector_meta"))
        state[idx] = st
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    if projectors:
        _, proj_cls = import_galore()
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx, (mat, meta) in projectors.items():
            proj = proj_cls(meta["rank"], update_proj_gap=meta["update_proj_gap"], scale=meta["scale"],
                            proj_type=meta["proj_type"])
            proj.ortho_matrix = mat
            opt.state[params[int(idx)]]["projector"] = proj
