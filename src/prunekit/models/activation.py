"""Activation thresholds on a model in memory: the sites, the masks that apply them, their installed state.

A *site* is one place where activations are thresholded at inference:

* ``input``: the input of one linear (TEAL; CHESS's q and o) — entries with ``|x| <= t`` become
  zero, so a kernel can skip the weight rows (input channels) they would multiply;
* ``gate``: the output of a gated MLP's activation function, ``act(gate_proj(x))`` (CATS, CHESS) —
  a zero channel makes that channel's row of ``up_proj`` and column of ``down_proj`` unnecessary.

A threshold is a float32 scalar (one per site) or a vector (one per channel, CHESS). Entries are
kept when ``|x| > t`` (compared in float32 whatever the model's dtype, so the masked PyTorch model
and the C++ kernels agree bit for bit on which entries survive).

This is the model-side half, as :mod:`.lowrank` is for factorized layers: :mod:`prunekit.activation`
calibrates the thresholds, :mod:`prunekit.formats.activation` saves them beside the weights and
installs them again when a folder is loaded, and :mod:`prunekit.kernels` runs them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError

INPUT, GATE = "input", "gate"


def keep_mask(x: Tensor, threshold: Tensor) -> Tensor:
    """``|x| > threshold`` in float32 (a scalar threshold, or one per channel of the last dim)."""
    return x.abs().float() > threshold


def apply_threshold(x: Tensor, threshold: Tensor) -> Tensor:
    """``x`` with the entries at or below the threshold set to zero (same dtype as ``x``)."""
    return x * keep_mask(x, threshold).to(x.dtype)


@dataclass
class Site:
    """One thresholded place of a model and the linears whose weight reads its zeros save.

    Attributes:
        name: qualified module name: the linear (``input``) or the MLP (``gate``).
        kind: ``input`` or ``gate``.
        width: channels of the thresholded activation.
        skipped_params: weights a kernel need not read per zeroed channel, summed over the channels
            (``input``: the linear's weights; ``gate``: up_proj's plus down_proj's).
        channelwise: one threshold per channel (else one per site).
    """

    name: str
    kind: str
    width: int
    skipped_params: int
    channelwise: bool = False


class Counter:
    """Counts kept and total entries seen at a site (the achieved sparsity on some data)."""

    def __init__(self) -> None:
        self.kept = 0
        self.total = 0

    def add(self, mask: Tensor) -> None:
        self.kept += int(mask.sum())
        self.total += mask.numel()

    @property
    def sparsity(self) -> float | None:
        return 1.0 - self.kept / self.total if self.total else None


def _prompt_dense(mask: Tensor, tokens: int) -> Tensor:
    """``mask`` with the first ``tokens`` positions of every sequence kept (``[..., seq, channels]``)."""
    if tokens > 0 and mask.dim() >= 2:
        mask[..., :tokens, :] = True
    return mask


class InputMask:
    """Forward pre-hook of a linear: zero its input's entries at or below the threshold.

    ``dense_tokens``: the first that many positions of each sequence pass unchanged (a prompt
    prefilled densely; :meth:`ActivationState.dense_prompt`).
    """

    def __init__(self, threshold: Tensor) -> None:
        self.threshold = threshold
        self.counter: Counter | None = None
        self.dense_tokens = 0

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        mask = _prompt_dense(keep_mask(x, self.threshold), self.dense_tokens)
        if self.counter is not None:
            self.counter.add(mask)
        return (x * mask.to(x.dtype), *args[1:])


class GateMask(nn.Module):
    """Wraps a gated MLP's activation function: ``act(g)`` with its small entries set to zero."""

    def __init__(self, act: nn.Module, threshold: Tensor) -> None:
        super().__init__()
        self.act = act
        self.threshold = threshold  # a plain attribute: never part of the state dict
        self.counter: Counter | None = None
        self.dense_tokens = 0

    def forward(self, g: Tensor) -> Tensor:
        h = self.act(g)
        mask = _prompt_dense(keep_mask(h, self.threshold), self.dense_tokens)
        if self.counter is not None:
            self.counter.add(mask)
        return h * mask.to(h.dtype)


def gated_mlp(model_or_block: nn.Module, name: str, label: str | None = None) -> nn.Module:
    """The MLP ``name`` if it has the gated form ``down(act(gate(x)) * up(x))``; else a ConfigError."""
    label = label or name
    try:
        mlp = model_or_block.get_submodule(name)
    except AttributeError:
        mlp = None
    act = mlp.act_fn.act if isinstance(getattr(mlp, "act_fn", None), GateMask) else getattr(mlp, "act_fn", None)
    if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) or act is None:
        raise ConfigError(f"{label} ({type(mlp).__name__}) is not a gated MLP with gate_proj, up_proj, down_proj and "
                          "act_fn; methods cats and chess need one (Llama, Qwen2, Mistral, Gemma): use --act-method teal")
    return mlp


@dataclass
class ActivationState:
    """The thresholds installed on a model (``model.prunekit_activation``) and what calibration measured.

    Attributes:
        method: the activation method's name.
        config: the :class:`~prunekit.families.ActivationSparsityConfig` as a dict.
        sites: every thresholded site, by name.
        thresholds: float32 threshold per site (scalar or per channel).
        report: per-site calibration sparsity, allocation and summary numbers.
    """

    method: str
    config: dict[str, Any]
    sites: dict[str, Site]
    thresholds: dict[str, Tensor]
    report: dict[str, Any] = field(default_factory=dict)
    _masks: dict = field(default_factory=dict, repr=False)  # site -> (InputMask | GateMask, undo)

    def install(self, model: nn.Module) -> ActivationState:
        """Apply every threshold to ``model`` (hooks on linears, wrapped activation functions)."""
        self.remove()
        for name in self.sites:
            self.attach(model, name)
        model.prunekit_activation = self
        return self

    def attach(self, model: nn.Module, name: str):
        """Apply the threshold of one site (already in ``sites``/``thresholds``); returns its mask object."""
        site, t = self.sites[name], self.thresholds[name].float()
        if site.kind == INPUT:
            lin = model.get_submodule(name)
            mask = InputMask(t.to(lin.weight.device))
            handle = lin.register_forward_pre_hook(mask)
            undo = handle.remove
        else:
            mlp = gated_mlp(model, name)
            inner = mlp.act_fn.act if isinstance(mlp.act_fn, GateMask) else mlp.act_fn
            mask = mlp.act_fn = GateMask(inner, t.to(mlp.up_proj.weight.device))

            def undo(mlp=mlp, inner=inner):
                mlp.act_fn = inner
        self._masks[name] = (mask, undo)
        return mask

    def mask(self, name: str):
        """The installed mask object of a site (its ``threshold`` and ``counter`` may be changed)."""
        return self._masks[name][0]

    @contextmanager
    def dense_prompt(self, tokens: int):
        """Inside: the first ``tokens`` positions of every sequence are computed densely, the rest thresholded.

        What generation does — the prompt prefilled densely, each new token thresholded — in one
        forward pass over a whole sequence (TEAL's evaluation protocol: a dense first half).
        """
        masks = [m for m, _ in self._masks.values()]
        for m in masks:
            m.dense_tokens = int(tokens)
        try:
            yield self
        finally:
            for m in masks:
                m.dense_tokens = 0

    def remove(self) -> None:
        """Take the thresholds off again (the model computes densely)."""
        for _, undo in self._masks.values():
            undo()
        self._masks.clear()

    def skipped_fraction(self, total_params: int, sparsity: dict[str, float] | None = None) -> float:
        """Fraction of ``total_params`` decoder-linear weights a kernel skips at the sites' sparsities."""
        sp = sparsity if sparsity is not None else {n: r["sparsity"] for n, r in self.report.get("sites", {}).items()}
        return sum(sp.get(n, 0.0) * s.skipped_params for n, s in self.sites.items()) / total_params


def state_of(model: nn.Module) -> ActivationState | None:
    """The activation thresholds installed on ``model`` (``None``: it computes densely)."""
    st = getattr(model, "prunekit_activation", None)
    return st if isinstance(st, ActivationState) else None
