"""The Python entry points: ``prune``, ``evaluate`` (and ``load_model`` from ``models``).

Three lines prune a model::

    model, tok = prunekit.load_model("smollm2-135m")
    report = prunekit.prune(model, prunekit.PruneConfig(method="wanda", sparsity=0.5), tokenizer=tok)
    print(prunekit.evaluate(model, tok)["wikitext2"].ppl)
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import Tensor, nn

from .allocation import build_allocator, nm_allocation, weighted_mean
from .allocation.base import block_lookup
from .calibration import BlockEvent, run_sequential
from .config import EvalConfig, PruneConfig, to_dict
from .data import calibration_ids
from .eval import PerplexityResult, check_seqlen, perplexity
from .masks import Pattern
from .methods import Target, build_method
from .models import decoder_linears, weight_view
from .report import Report

log = logging.getLogger(__name__)


def select_linears(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """The linears ``config`` selects, checked for N:M divisibility and finite weights."""
    linears = decoder_linears(model, config.include, config.exclude)
    if not linears:
        raise ValueError(
            f"no linear layer matches include={list(config.include)} exclude={list(config.exclude)}; "
            "loosen the regexes (they are matched with re.search on names like model.layers.0.mlp.up_proj)"
        )
    pattern = config.pattern_obj
    for name, mod in linears.items():
        w = weight_view(mod)
        pattern.check_width(w.shape[1], name)
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"{name} has {bad} NaN/Inf weights; the model is corrupt — reload or re-download it")
    return linears


def make_targets(alloc: dict[str, float], pattern: Pattern, params: dict[str, int] | None = None,
                 groups: dict[str, object] | None = None, target: float | None = None) -> dict[str, Target]:
    """Per-linear targets from an allocation.

    Unstructured: each layer's own sparsity. N:M with a non-uniform allocation (mixed N:M):
    one N per group (``groups``: name → block; default one per layer), rounded so that the
    parameter-weighted mean sparsity is as close to ``target`` (default: the allocation's own
    mean) as the 1/M granularity allows (:func:`prunekit.allocation.nm_allocation`).
    """
    if not pattern.is_nm or all(abs(s - pattern.sparsity) <= 1e-9 for s in alloc.values()):
        return {name: Target(pattern.sparsity if pattern.is_nm else s, pattern) for name, s in alloc.items()}
    params = params or {n: 1 for n in alloc}
    if target is None:
        target = weighted_mean(alloc, params)
    n_of = nm_allocation(alloc, params, pattern.m, target, groups)
    out = {}
    for name, n in n_of.items():
        p = Pattern("nm", n, pattern.m)
        out[name] = Target(p.sparsity, p)
    return out


def allocation_summary(alloc: dict[str, float], targets: dict[str, Target], params: dict[str, int], block_of,
                       target: float) -> dict:
    """What the allocation decided: target, requested and achieved means, per-block sparsity."""
    per_block: dict[int, list[float]] = {}
    for n, t in targets.items():
        acc = per_block.setdefault(block_of(n), [0.0, 0.0])
        acc[0] += t.sparsity * params[n]
        acc[1] += params[n]
    achieved = weighted_mean({n: t.sparsity for n, t in targets.items()}, params)
    return {
        "target": target,
        "allocated_mean": weighted_mean(alloc, params),
        "achieved_mean": achieved,
        "min": min((t.sparsity for t in targets.values()), default=0.0),
        "max": max((t.sparsity for t in targets.values()), default=0.0),
        "per_block": {b: v[0] / v[1] for b, v in sorted(per_block.items())},
        "patterns": sorted({str(t.pattern) for t in targets.values()}),
    }


def _check_calib(ids: Tensor, model: nn.Module) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(
            "calibration must be a LongTensor of token ids shaped [nsamples, seqlen]; got "
            f"{type(ids).__name__} {getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}"
        )
    check_seqlen(model, ids.shape[1], "calibration seqlen")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab and int(ids.max()) >= vocab:
        raise ValueError(f"calibration token id {int(ids.max())} is outside the model's vocabulary ({vocab})")
    return ids


def prune(
    model: nn.Module,
    config: PruneConfig,
    calib: Tensor | None = None,
    tokenizer=None,
    device: torch.device | str | None = None,
    callback: Callable[[BlockEvent], None] | None = None,
) -> Report:
    """Compress ``model`` in place as ``config`` says and return the :class:`Report`.

    Args:
        model: a Hugging Face causal LM.
        config: method, sparsity, pattern, allocation, layer selection and calibration settings.
        calib: calibration token ids ``[n, seqlen]``; if ``None`` they are drawn from
            ``config.calib`` with ``tokenizer`` (methods that need no calibration skip this).
        tokenizer: needed only when ``calib`` is ``None`` and the method/allocation calibrates.
        device: compute device (``None`` = the model's device).
        callback: called after each block (progress bars).
    """
    t0 = time.perf_counter()
    method = build_method(config.method, **dict(config.method_options))
    if config.refine:
        from .methods.refine import RefinedMethod, build_refiner

        method = RefinedMethod(method, build_refiner(config.refine, **dict(config.refine_options)))
    allocator = build_allocator(config.allocation, **dict(config.allocation_options))
    linears = select_linears(model, config)
    pattern = config.pattern_obj
    need_calib = method.needs_calibration or allocator.needs_calibration
    calib_info: dict = {}
    if need_calib:
        if calib is None:
            if tokenizer is None:
                raise ValueError(f"method {config.method!r} needs calibration: pass calib token ids or a tokenizer")
            check_seqlen(model, config.calib.seqlen, "calibration seqlen")
            calib = calibration_ids(config.calib, tokenizer)
            calib_info = {"source": config.calib.dataset, "seed": config.calib.seed}
        calib = _check_calib(calib, model)
        calib_info.update(nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=config.calib.batch_size)
    alloc = allocator.allocate(model, linears, config.sparsity, pattern, calib if allocator.needs_calibration else None)
    params = {n: weight_view(m).numel() for n, m in linears.items()}
    block_of = block_lookup(model)
    targets = make_targets(alloc, pattern, params, {n: block_of(n) for n in alloc}, config.sparsity)
    alloc_summary = allocation_summary(alloc, targets, params, block_of, config.sparsity)
    alloc_summary.update(name=config.allocation, options=dict(config.allocation_options), info=allocator.info)
    log.info("%s, %s, %s allocation: %d linears, allocated sparsity %.4f (target %.4f)", config.method, pattern,
             config.allocation, len(targets), alloc_summary["achieved_mean"], config.sparsity)
    report = run_sequential(model, calib if method.needs_calibration else None, method, targets,
                            config.calib.batch_size, device, callback)
    report.method, report.target_sparsity, report.pattern = config.method, config.sparsity, str(pattern)
    report.allocation = config.allocation
    report.calibration = calib_info
    report.extra["allocation"] = alloc_summary
    report.config = to_dict(config)
    summary = getattr(getattr(method, "inner", method), "summary", None)
    if summary:  # a method's global decision (WeLore's tau and achieved reductions)
        report.extra["method_summary"] = summary
    report.seconds = time.perf_counter() - t0
    log.info("pruned to %.4f sparsity (target %.4f) in %.1fs", report.sparsity, config.sparsity, report.seconds)
    return report


def evaluate(model: nn.Module, tokenizer, config: EvalConfig | None = None, data_dir=None,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, PerplexityResult]:
    """Perplexity of ``model`` on each dataset of ``config`` (default: WikiText-2, seqlen 2048)."""
    config = config or EvalConfig()
    out = {}
    for ds in config.datasets:
        cb = (lambda i, n, _ds=ds: progress(_ds, i, n)) if progress else None
        out[ds] = perplexity(model, tokenizer, ds, config.seqlen, config.max_windows, config.batch_size, data_dir, cb)
    return out
