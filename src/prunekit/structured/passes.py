"""Dense passes over the calibration set that rank whole blocks, and gather statistics of every linear.

Block removal and global decisions need every block's numbers before the first block changes,
so they come from the *dense* model (as OWL's outlier ratios do), not from the sequential engine:

* :func:`block_influence` — ShortGPT's ``BI = 1 - mean_tokens cos(x_in, x_out)`` per block, and the
  same for an FFN sub-block (``x_out`` against ``x_out`` minus the FFN's contribution);
* :func:`removal_nll` — the calibration loss with one block (or one FFN) skipped, every candidate,
  reusing the dense activations up to the candidate so each costs only the blocks after it;
* :func:`dense_stats` — :class:`~prunekit.methods.base.InputStats` of chosen linears (FLAP/Wanda/
  SlimGPT scores of every layer for the global threshold).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..calibration.context import StopForward, calibration_forward_context, capture_block_inputs, hooked_pass
from ..methods.base import InputStats
from ..models import find_blocks, model_device
from ..models.structure import block_parts


def _hidden_in(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def block_influence(model: nn.Module, calib_ids: Tensor, kind: str = "blocks", batch_size: int = 8) -> list[float]:
    """ShortGPT's block influence of every block (``kind="blocks"``) or of every block's FFN (``"ffn"``).

    ``BI_i = 1 - mean over tokens of cos(x_i, x_{i+1})`` (Men et al. 2024, eq. 1) on the dense model.
    For an FFN, ``x_{i+1}`` is compared with ``x_{i+1} - f_i``, ``f_i`` being what the FFN adds to the
    residual stream (FFN-SkipLLM's redundancy measure, Jaiswal et al. 2024, made static).
    """
    path, blocks = find_blocks(model)
    parts = block_parts(model) if kind == "ffn" else None
    sums = [0.0] * len(blocks)
    count = [0] * len(blocks)
    contrib: dict[int, Tensor] = {}
    handles = []

    def on_block(i: int):
        def hook(_m, args, kwargs, out):
            y = _hidden_out(out).float()
            x = y - contrib.pop(i).float().reshape(y.shape) if kind == "ffn" else _hidden_in(args, kwargs).float()
            cos = F.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
            sums[i] += float(cos.double().sum())
            count[i] += cos.numel()
            if i == len(blocks) - 1:
                raise StopForward
        return hook

    def on_ffn(i: int):
        def hook(_m, _a, out):
            contrib[i] = _hidden_out(out)
        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_hook(on_block(i), with_kwargs=True))
        if parts is not None:
            handles.append(model.get_submodule(parts[i].ffn.contribution).register_forward_hook(on_ffn(i)))
    try:
        hooked_pass(model, calib_ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(c, 1) for s, c in zip(sums, count)]


@contextlib.contextmanager
def _skip(blocks: nn.ModuleList, upto: int, hidden: Tensor, template) -> Iterator[None]:
    """Blocks ``0..upto`` return ``hidden`` at once (in the structure a block returns)."""
    out = (hidden, *template[1:]) if isinstance(template, (tuple, list)) else hidden
    saved = [blocks[j].__dict__.get("forward") for j in range(upto + 1)]
    for j in range(upto + 1):
        blocks[j].forward = lambda *a, **k: out
    try:
        yield
    finally:
        for j, f in enumerate(saved):
            if f is None:
                del blocks[j].forward
            else:
                blocks[j].forward = f


@contextlib.contextmanager
def _zero_output(module: nn.Module) -> Iterator[None]:
    h = module.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
    try:
        yield
    finally:
        h.remove()


def removal_nll(model: nn.Module, calib_ids: Tensor, kind: str, candidates: list[int],
                progress: Callable[[int, int], None] | None = None) -> tuple[float, dict[int, float]]:
    """Mean next-token NLL of the dense model, and with each candidate block (or its FFN) removed.

    The dense inputs of block ``i`` are computed once; removing block ``i`` then runs only blocks
    ``i+1..`` and the head (blocks ``0..i`` return the stored input at once). Removing block ``i``'s
    FFN runs block ``i`` with the FFN's contribution zeroed. One sequence per forward (the logits
    of a whole batch would not fit).
    """
    path, blocks = find_blocks(model)
    parts = block_parts(model) if kind == "ffn" else None
    dev = model_device(model)
    ids = calib_ids.to(dev)
    out: dict[int, float] = {}
    with calibration_forward_context(model):
        inputs = capture_block_inputs(model, blocks, ids, 1, dev)
        template = _raw_call(blocks[0], inputs.calls[0][0], inputs.hidden[0])
        dense = _nll(model, ids)
        hidden = list(inputs.hidden)
        wanted = set(candidates)
        for i in range(len(blocks)):
            if i in wanted:
                total = 0.0
                for b in range(ids.shape[0]):
                    if kind == "blocks":
                        with _skip(blocks, i, hidden[b], template):
                            total += _nll(model, ids[b : b + 1])
                    else:
                        ctx = _skip(blocks, i - 1, hidden[b], template) if i > 0 else contextlib.nullcontext()
                        with ctx, _zero_output(model.get_submodule(parts[i].ffn.contribution)):
                            total += _nll(model, ids[b : b + 1])
                out[i] = total / ids.shape[0]
                if progress is not None:
                    progress(len(out), len(wanted))
            if i < len(blocks) - 1 and any(c > i for c in wanted):
                hidden = [inputs.calls[i][b](blocks[i], hidden[b]) for b in range(len(hidden))]
    return dense, out


def _raw_call(block: nn.Module, call, hidden: Tensor):
    """What ``block`` returns (tensor or tuple) for one recorded call: the structure the stubs mimic."""
    if call.hidden_kw:
        return block(*call.args, **{**call.kwargs, "hidden_states": hidden})
    return block(hidden, *call.args, **call.kwargs)


def _nll(model: nn.Module, ids: Tensor) -> float:
    """Mean next-token NLL of ``ids`` (``[n, seqlen]``), one sequence per forward."""
    total = 0.0
    for b in range(ids.shape[0]):
        x = ids[b : b + 1]
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, x[0, 1:], reduction="mean"))
    return total / ids.shape[0]


def dense_stats(model: nn.Module, linears: dict[str, nn.Module], calib_ids: Tensor, batch_size: int,
                make: Callable[[str, nn.Module], InputStats | None]) -> dict[str, InputStats]:
    """InputStats of ``linears`` on the dense model in one forward; linears fed the same tensor share one."""
    stats: dict[str, InputStats] = {}
    seen: dict[int, tuple[Tensor, InputStats]] = {}
    handles = []
    for name, mod in linears.items():
        st = make(name, mod)
        if st is None:
            continue

        def hook(_m, args, _st=st, _name=name):
            x = args[0]
            prev = seen.get(id(x))
            if prev is not None and prev[0] is x:  # same tensor as an earlier linear: share its statistics
                stats[_name] = prev[1]
                return
            stats[_name] = _st
            _st.update(x)
            seen[id(x)] = (x, _st)

        handles.append(mod.register_forward_pre_hook(hook))
    path, blocks = find_blocks(model)
    try:
        hooked_pass(model, calib_ids, batch_size, blocks[-1], seen.clear)
    finally:
        for h in handles:
            h.remove()
    return stats


def output_means(model: nn.Module, names: list[str], calib_ids: Tensor, batch_size: int = 8) -> dict[str, Tensor]:
    """Mean output (over calibration tokens) of each named module, on the dense model (float64 sums)."""
    sums: dict[str, list] = {n: [None, 0] for n in names}
    handles = []
    for n in names:
        def hook(_m, _a, out, _n=n):
            y = _hidden_out(out).detach().reshape(-1, _hidden_out(out).shape[-1]).to(torch.float64)
            acc = sums[_n]
            acc[0] = y.sum(0) if acc[0] is None else acc[0] + y.sum(0)
            acc[1] += y.shape[0]
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    path, blocks = find_blocks(model)
    try:
        hooked_pass(model, calib_ids, batch_size, blocks[-1])
    finally:
        for h in handles:
            h.remove()
    return {n: (v[0] / max(v[1], 1)).to(torch.float32) for n, v in sums.items()}

