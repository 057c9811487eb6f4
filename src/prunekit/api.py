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

from .activation import sparsify_activations  # noqa: F401  (re-exported: prunekit.sparsify_activations)
from .allocation import allocation_summary, build_allocator, make_targets
from .allocation.base import Allocator
from .calibration import BlockEvent, run_sequential
from .config import EvalConfig, PruneConfig, to_dict
from .data import calibration_ids
from .errors import ConfigError
from .eval import PerplexityResult, check_seqlen, perplexity
from .methods import Method, Target, build_method
from .models import block_lookup, check_finite, decoder_linears, weight_view
from .registry import REFINERS, STRUCTURED
from .report import Report, RunInfo
from .structured import check_structured, prune_structured

log = logging.getLogger(__name__)


def build_components(config: PruneConfig) -> tuple[Method, Allocator]:
    """The configured method (wrapped with its refiner) and allocator, every option validated.

    Cheap and model-free, so the CLI calls it before loading anything. With a structured pattern
    the "method" is a structured criterion (:data:`prunekit.registry.STRUCTURED`).

    Raises:
        ConfigError: an unknown name, a bad option, or a pattern the method cannot produce.
    """
    allocator = build_allocator(config.allocation, config.allocation_options)
    pattern = config.pattern_obj
    # --- structured patterns (prunekit.structured) ---
    if pattern.is_structured:
        criterion = STRUCTURED.build(config.method, config.method_options)
        if pattern.kind not in criterion.patterns:
            raise ConfigError(f"criterion {config.method!r} cannot serve pattern {pattern} (it serves: "
                              f"{', '.join(criterion.patterns)}); for {pattern} use one of: "
                              f"{', '.join(n for n in STRUCTURED.names() if pattern.kind in STRUCTURED.get(n).patterns)}")
        return criterion, allocator
    if getattr(allocator, "structured_only", False):
        raise ConfigError(f"allocation {config.allocation!r} ranks whole heads/channels: use it with a structured "
                          "--pattern (channels, heads, width)")
    # --- end structured ---
    method = build_method(config.method, config.method_options, config.refine, config.refine_options)
    if pattern.kind not in method.patterns:
        raise ConfigError(f"method {config.method!r} cannot produce pattern {pattern} (it makes: "
                          f"{', '.join(method.patterns)}); choose another --pattern or --method")
    return method, allocator


def select_linears(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """The linears ``config`` selects, checked for N:M divisibility."""
    linears = decoder_linears(model, config.include, config.exclude)
    if not linears:
        raise ConfigError(
            f"no linear layer matches include={list(config.include)} exclude={list(config.exclude)}; "
            "loosen the regexes (they are matched with re.search on names like model.layers.0.mlp.up_proj)"
        )
    for name, mod in linears.items():
        config.pattern_obj.check_width(weight_view(mod).shape[1], name)
    return linears


def check_model(model: nn.Module, config: PruneConfig) -> dict[str, nn.Module]:
    """Everything about ``model`` that can fail before any work (the CLI calls it before the dense baseline)."""
    linears = select_linears(model, config)
    if config.pattern_obj.is_structured:
        criterion, _ = build_components(config)
        check_structured(model, config.pattern_obj, criterion, linears, config.sparsity,
                         uniform=config.allocation == "uniform")
    return linears


def _check_calib(ids: Tensor, model: nn.Module) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.dim() != 2 or ids.shape[0] == 0:
        raise ConfigError(
            "calibration must be a LongTensor of token ids shaped [nsamples, seqlen]; got "
            f"{type(ids).__name__} {getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}"
        )
    check_seqlen(model, ids.shape[1], "calibration seqlen")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab and int(ids.max()) >= vocab:
        raise ConfigError(f"calibration token id {int(ids.max())} is outside the model's vocabulary ({vocab})")
    return ids


def _calibration(model: nn.Module, config: PruneConfig, calib: Tensor | None, tokenizer,
                 data_dir) -> tuple[Tensor, dict]:
    """The calibration ids (given, or drawn from ``config.calib``) and what the report says of them."""
    info: dict = {}
    if calib is None:
        if tokenizer is None:
            raise ConfigError(f"method {config.method!r} needs calibration: pass calib token ids or a tokenizer")
        check_seqlen(model, config.calib.seqlen, "calibration seqlen")
        calib = calibration_ids(config.calib, tokenizer, data_dir)
        info = {"source": config.calib.dataset, "seed": config.calib.seed}
    calib = _check_calib(calib, model)
    info.update(nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=config.calib.batch_size)
    return calib, info


def _targets(model: nn.Module, config: PruneConfig, allocator: Allocator, linears: dict[str, nn.Module],
             calib: Tensor | None, weights=None) -> tuple[dict[str, Target], dict]:
    """Per-linear targets from the allocator, and the allocation's summary for the report.

    ``weights``: the linears as the allocator reads them (default ``linears``; a streamed model
    passes a mapping that reads each weight from the checkpoint when asked for).
    """
    pattern = config.pattern_obj
    alloc = allocator.allocate(model, linears if weights is None else weights, config.sparsity, pattern,
                               calib if allocator.needs_calibration else None)
    params = {n: weight_view(m).numel() for n, m in linears.items()}
    block_of = block_lookup(model)
    targets = make_targets(alloc, pattern, params, {n: block_of(n) for n in alloc}, config.sparsity)
    summary = allocation_summary(alloc, targets, params, block_of, config.sparsity)
    summary.update(name=config.allocation, options=dict(config.allocation_options), info=allocator.info)
    log.info("%s, %s, %s allocation: %d linears, allocated sparsity %.4f (target %.4f)", config.method, pattern,
             config.allocation, len(targets), summary["achieved_mean"], config.sparsity)
    return targets, summary


def prune(
    model: nn.Module,
    config: PruneConfig,
    calib: Tensor | None = None,
    tokenizer=None,
    device: torch.device | str | None = None,
    callback: Callable[[BlockEvent], None] | None = None,
    data_dir=None,
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
        data_dir: where local dataset copies are (``None``: ``$PRUNEKIT_DATA``).
    """
    t0 = time.perf_counter()
    method, allocator = build_components(config)
    linears = check_model(model, config)
    check_finite(model)
    calib_info: dict = {}
    if method.needs_calibration or allocator.needs_calibration:
        calib, calib_info = _calibration(model, config, calib, tokenizer, data_dir)
    if config.pattern_obj.is_structured:  # whole units removed: prunekit.structured
        info = RunInfo(config.method, config.sparsity, config.pattern, config.allocation, calib_info,
                       to_dict(config), {}, started=t0)
        refiner = REFINERS.build(config.refine, config.refine_options) if config.refine else None
        report = prune_structured(model, config.pattern_obj, config.sparsity, method, allocator, linears, calib, info,
                                  config.calib.batch_size, device, callback, refiner)
        log.info("removed %d parameters in %.1fs", report.extra["structure"]["params_removed"], report.seconds)
        return report
    targets, alloc_summary = _targets(model, config, allocator, linears, calib)
    info = RunInfo(config.method, config.sparsity, config.pattern, config.allocation, calib_info, to_dict(config),
                   {"allocation": alloc_summary}, started=t0)
    report = run_sequential(model, calib if method.needs_calibration else None, method, targets,
                            config.calib.batch_size, device, callback, info=info)
    log.info("pruned to %.4f sparsity (target %.4f) in %.1fs", report.sparsity, config.sparsity, report.seconds)
    return report


def evaluate(model: nn.Module, tokenizer, config: EvalConfig | None = None, data_dir=None,
             progress: Callable[[str, int, int], None] | None = None,
             token_cache: dict | None = None) -> dict[str, PerplexityResult]:
    """Perplexity of ``model`` on each dataset of ``config`` (default: WikiText-2, seqlen 2048).

    ``token_cache``: a dict to keep the tokenized texts in between calls (dense, then compressed).
    """
    config = config or EvalConfig()
    out = {}
    for ds in config.datasets:
        cb = (lambda i, n, _ds=ds: progress(_ds, i, n)) if progress else None
        out[ds] = perplexity(model, tokenizer, ds, config.seqlen, config.max_windows, config.batch_size, data_dir, cb,
                             token_cache)
    return out
