"""Run a model with the sparse decode kernels: modules that pick a kernel by token count.

:func:`prepare_decode` swaps, in place, every decoder linear that has something to skip for a
:class:`DecodeLinear` (input-major weights, dense or :class:`~.ops.BitmaskT`; its activation
threshold, if any) and every gated MLP with a ``gate`` threshold (CATS, CHESS) for a
:class:`SparseFFN`. One token (decode, batch 1) goes through the sparse kernels; more tokens
(prefill, batches) through a dense matmul on the same weights: on dense W^T that costs about what
the stock module did (0.90x bf16, 1.02x fp32), but a bitmask weight is unpacked a few tiles at a
time for every call, which makes a weight-sparse prefill slower than dense (Qwen2.5-1.5B, 128
tokens, AMD EPYC: 0.79x bf16, 0.94-0.95x fp32; benchmarks/results/sparse_decode.md, runs 9-10).
The activation thresholds' PyTorch masks are taken off while the kernels apply them, and
:meth:`DecodeHandle.restore` gives back the stock modules with bit-identical weights.

Prefill is dense and unmasked by default (TEAL's and CATS' kernels sparsify decoding only):
perplexity measured with every token masked (``prunekit.sparsify_activations``) is the
conservative number. ``sparse_prefill=True`` masks the prompt too (still a dense matmul).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models.activation import GATE, INPUT, GateMask, apply_threshold, gated_mlp, state_of
from ..errors import ConfigError
from ..models import decoder_linears, set_module
from . import ops

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("auto", "dense", "bitmask")
#: "auto" stores a linear as a bitmask from this weight sparsity on (fewer bytes and a faster GEMV)
AUTO_BITMASK_FROM = 0.25


def _tokens(x: Tensor, width: int) -> int:
    return x.numel() // width


class DecodeLinear(nn.Module):
    """``y = W x (+ b)`` with ``W`` stored input-major: dense ``W^T`` or a :class:`~.ops.BitmaskT`.

    One token: :func:`~.ops.gemv_t` / :func:`~.ops.gemv_bitmask`, skipping the rows of inputs at or
    below ``threshold``. More tokens: ``x @ W^T`` (the bitmask is unpacked for the call).
    """

    def __init__(self, linear: nn.Linear, fmt: str, threshold: Tensor | None, sparse_prefill: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt = linear.in_features, linear.out_features, fmt
        wt = linear.weight.detach().t().contiguous()
        self.wt = wt if fmt == "dense" else None
        self.packed = ops.pack_bitmask(wt) if fmt == "bitmask" else None
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.threshold = None if threshold is None else threshold.float().reshape(-1).contiguous()
        self.sparse_prefill = sparse_prefill
        self.stats = torch.zeros(2, dtype=torch.int64)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if _tokens(x, self.in_features) == 1:
            v = x.reshape(-1)
            if self.fmt == "dense":
                y = ops.gemv_t(v, self.wt, self.threshold, self.bias, self.stats)
            else:
                y = ops.gemv_bitmask(v, self.packed, self.threshold, self.bias, self.stats)
            return y.reshape(*lead, self.out_features)
        if self.threshold is not None and self.sparse_prefill:
            x = apply_threshold(x, self.threshold)
        if self.fmt == "bitmask":
            return ops.bitmask_matmul(x, self.packed, self.bias)
        y = torch.matmul(x, self.wt)
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        return self.wt.numel() * self.wt.element_size() if self.fmt == "dense" else self.packed.nbytes

    def to_linear(self) -> nn.Linear:
        wt = self.wt if self.fmt == "dense" else ops.unpack_bitmask(self.packed)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(wt.t().contiguous(), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias, requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        t = "none" if self.threshold is None else ("per-channel" if self.threshold.numel() > 1 else "scalar")
        return f"in={self.in_features}, out={self.out_features}, format={self.fmt}, threshold={t}"


class SparseFFN(nn.Module):
    """A gated MLP ``down(act(gate(x)) * up(x))`` whose activation is thresholded (CATS, CHESS).

    One token: ``gate`` densely, then :func:`~.ops.sparse_ffn` reads only the rows of ``up`` and of
    ``down^T`` whose channel survives. More tokens: the dense MLP on the same weights.
    """

    def __init__(self, mlp: nn.Module, threshold: Tensor, sparse_prefill: bool = False) -> None:
        super().__init__()
        if mlp.up_proj.bias is not None or mlp.down_proj.bias is not None:
            raise ConfigError("the sparse FFN kernel needs up_proj and down_proj without biases")
        self.gate_proj = mlp.gate_proj
        self.act = mlp.act_fn.act if isinstance(mlp.act_fn, GateMask) else mlp.act_fn
        self.wup = mlp.up_proj.weight.detach()
        self.wdt = mlp.down_proj.weight.detach().t().contiguous()
        self.threshold = threshold.float().reshape(-1).contiguous()
        self.sparse_prefill = sparse_prefill
        self.stats = torch.zeros(2, dtype=torch.int64)
        self.original = [mlp]  # a list: not a submodule; its down_proj weight is dropped while converted
        mlp.down_proj.weight = nn.Parameter(torch.empty(0, dtype=self.wdt.dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate_proj(x))
        if _tokens(x, self.wup.shape[1]) == 1:
            y = ops.sparse_ffn(h.reshape(-1), x.reshape(-1), self.threshold, self.wup, self.wdt, self.stats)
            return y.reshape(x.shape)
        if self.sparse_prefill:
            h = apply_threshold(h, self.threshold)
        return torch.matmul(h * nn.functional.linear(x, self.wup), self.wdt)

    def restore(self) -> nn.Module:
        mlp = self.original[0]
        mlp.down_proj.weight = nn.Parameter(self.wdt.t().contiguous(), requires_grad=False)
        return mlp


@dataclass
class DecodeHandle:
    """What :func:`prepare_decode` changed; :meth:`restore` undoes it."""

    model: nn.Module
    linears: dict[str, DecodeLinear] = field(default_factory=dict)
    ffns: dict[str, SparseFFN] = field(default_factory=dict)

    def restore(self) -> nn.Module:
        while self.linears:  # one at a time, as converted: never two copies of every weight
            name, mod = self.linears.popitem()
            set_module(self.model, name, mod.to_linear())
            del mod
        while self.ffns:
            name, mod = self.ffns.popitem()
            set_module(self.model, name, mod.restore())
        state = state_of(self.model)
        if state is not None:
            state.install(self.model)
        return self.model

    def sparsity(self) -> dict[str, float]:
        """Fraction of inputs (channels) each module skipped since the last :meth:`reset_stats`."""
        mods = {**self.linears, **self.ffns}
        return {n: 1 - int(m.stats[0]) / int(m.stats[1]) for n, m in mods.items() if int(m.stats[1])}

    def reset_stats(self) -> None:
        for m in [*self.linears.values(), *self.ffns.values()]:
            m.stats.zero_()

    def weight_bytes(self) -> int:
        """Bytes of the converted modules' weights as stored (decode reads at most these)."""
        return sum(m.weight_bytes() for m in self.linears.values()) + sum(
            (m.wup.numel() + m.wdt.numel()) * m.wup.element_size() for m in self.ffns.values())


def _weight_format(lin: nn.Linear, weights: str) -> str:
    if weights != "auto":
        return weights
    zeros = float((lin.weight == 0).float().mean())
    return "bitmask" if zeros >= AUTO_BITMASK_FROM else "dense"


def prepare_decode(model: nn.Module, weights: str = "auto", sparse_prefill: bool = False,
                   convert_all: bool = False) -> DecodeHandle:
    """Swap the modules with something to skip for kernel-backed ones (in place); see the module docstring.

    Args:
        model: a causal LM on the CPU (float32 or bfloat16), with or without activation thresholds.
        weights: ``dense`` (W^T as is), ``bitmask`` (every converted linear stored sparse), or
            ``auto`` (bitmask where a linear is at least 25 % zeros).
        sparse_prefill: also mask the prompt's activations (dense matmul all the same).
        convert_all: convert linears with nothing to skip too (measures the input-major layout alone).
    """
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"weight format {weights!r} is not one of: {', '.join(WEIGHT_FORMATS)}")
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"the sparse decode kernels run float32 or bfloat16 on the CPU; this model is {p.dtype} on "
                          f"{p.device}: load it with --device cpu --dtype float32 (or bfloat16)")
    state = state_of(model)
    sites = dict(state.sites) if state is not None else {}
    if state is not None:
        state.remove()  # the kernels apply the thresholds now
    handle = DecodeHandle(model)
    for name, site in sites.items():
        if site.kind == GATE:
            handle.ffns[name] = SparseFFN(gated_mlp(model, name), state.thresholds[name], sparse_prefill)
            set_module(model, name, handle.ffns[name])
    names = [n for n, m in decoder_linears(model).items() if isinstance(m, nn.Linear)]
    for name in names:  # one at a time: the old weight is freed before the next is converted
        if any(name.startswith(f + ".") for f in handle.ffns):
            continue
        lin = model.get_submodule(name)
        thr = state.thresholds[name] if name in sites and sites[name].kind == INPUT else None
        fmt = _weight_format(lin, weights)
        if thr is None and fmt == "dense" and not convert_all:
            continue  # nothing to skip: left stock (the W^T layout decodes faster here, prefills slower in bf16)
        handle.linears[name] = DecodeLinear(lin, fmt, thr, sparse_prefill)
        set_module(model, name, handle.linears[name])
        del lin
    log.info("decode kernels: %d linears (%d bitmask), %d sparse FFNs; C++ kernels %s", len(handle.linears),
             sum(m.fmt == "bitmask" for m in handle.linears.values()), len(handle.ffns),
             "on" if ops.extension() is not None else "off (PyTorch fallback)")
    return handle
