"""``sparsify_activations``: calibrate activation thresholds and install them on a model.

In two halves that :class:`~prunekit.families.ActivationFamily` (``prunekit.compress`` with an
``ActivationSparsityConfig``) runs as its calibration and run steps: :func:`activation_calibration`
(the token ids) and :func:`calibrate_thresholds` (the thresholds, installed, and their report).
The config is an :class:`~prunekit.families.ActivationSparsityConfig` (not imported here: the
family imports this package, never the other way round).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import decoder_linears, model_device, weight_view
from ..models.activation import ActivationState, Counter, state_of
from ..options import to_dict
from .base import ACTIVATION_METHODS
from .calibrate import BlockDone, calibrate, model_sites
from .rotate import rotate_residual, rotation_plan

log = logging.getLogger(__name__)


def check_activation(model: nn.Module, config) -> int:
    """Everything about ``model`` that can fail before calibration (a rotation's architecture too); returns the
    number of sites."""
    if config.rotate == "pca":
        rotation_plan(model)
    method = ACTIVATION_METHODS.get(config.method)()
    sites = [s for block in model_sites(model, method, config.include, config.exclude) for s in block]
    if not sites:
        raise ConfigError(f"activation include={list(config.include)} exclude={list(config.exclude)} select no site of "
                          f"method {config.method!r}; loosen the regexes (names like model.layers.0.mlp.up_proj)")
    return len(sites)


def activation_calibration(model: nn.Module, config, calib: Tensor | None, tokenizer, data_dir) -> tuple[Tensor, str]:
    """The calibration ids (``calib``, or drawn from ``config.calib`` with ``tokenizer``) and their source
    as the report names it (the dataset, or ``"given"``)."""
    from ..data import calibration_ids
    from ..eval import check_seqlen

    source = "given" if calib is not None else config.calib.dataset
    if calib is None:
        if tokenizer is None:
            raise ConfigError("activation sparsity needs calibration: pass calib token ids or a tokenizer")
        check_seqlen(model, config.calib.seqlen, "calibration seqlen")
        calib = calibration_ids(config.calib, tokenizer, data_dir)
    if not isinstance(calib, Tensor) or calib.dtype != torch.long or calib.dim() != 2 or calib.shape[0] == 0:
        raise ConfigError("calibration must be a LongTensor of token ids shaped [nsamples, seqlen]; got "
                          f"{type(calib).__name__} {tuple(getattr(calib, 'shape', ()))}")
    return calib, source


def _greedy_ids(calib: Tensor, tokens: int) -> Tensor:
    """The first ``tokens`` calibration tokens, as whole sequences cut to at most ``tokens`` long."""
    seqlen = calib.shape[1]
    if tokens <= seqlen:
        return calib[:1, :tokens]
    return calib[: -(-tokens // seqlen)]


def sparsify_activations(model: nn.Module, config, calib: Tensor | None = None, tokenizer=None, data_dir=None,
                         callback: Callable[[BlockDone], None] | None = None) -> ActivationState:
    """Calibrate activation thresholds for ``model`` and install them (the masked model); with
    ``config.rotate == "pca"`` the residual stream is rotated into its principal axes first (in place).

    Args:
        model: a Hugging Face causal LM (dense, or already weight-pruned: the thresholds are
            calibrated on the weights it has now).
        config: an :class:`~prunekit.families.ActivationSparsityConfig`: method, target sparsity,
            allocation and calibration settings.
        calib: calibration token ids ``[n, seqlen]``; ``None``: drawn from ``config.calib`` with ``tokenizer``.
        tokenizer: needed only when ``calib`` is ``None``.
        data_dir: local dataset copies (``None``: ``$PRUNEKIT_DATA``).
        callback: called after every block (progress bars).

    Returns:
        The installed :class:`ActivationState` (also ``model.prunekit_activation``); its
        ``report`` holds the per-site thresholds and the sparsity each reached on the calibration data.
    """
    t0 = time.perf_counter()
    check_activation(model, config)
    ids, source = activation_calibration(model, config, calib, tokenizer, data_dir)
    return rotate_then_calibrate(model, config, ids, source, callback, t0)


def rotate_then_calibrate(model: nn.Module, config, ids: Tensor, source: str,
                          callback: Callable[[BlockDone], None] | None = None,
                          started: float | None = None) -> ActivationState:
    """With ``config.rotate == "pca"``, rotate the residual stream on ``ids`` first
    (:func:`~prunekit.activation.rotate.rotate_residual`, its report in ``report["rotation"]``); then
    :func:`calibrate_thresholds`. Re-calibrating a model already rotated calls :func:`calibrate_thresholds`
    alone (a second rotation would be a rotation of the rotated stream)."""
    rotation = rotate_residual(model, ids, config.calib.batch_size) if config.rotate == "pca" else None
    state = calibrate_thresholds(model, config, ids, source, callback, started)
    if rotation is not None:
        state.report["rotation"] = rotation
    return state


def calibrate_thresholds(model: nn.Module, config, ids: Tensor, source: str,
                         callback: Callable[[BlockDone], None] | None = None,
                         started: float | None = None) -> ActivationState:
    """Calibrate on the checked ``ids`` (from :func:`activation_calibration`) and install the thresholds.

    ``source`` is what the report says the ids came from; ``started``: ``time.perf_counter()`` when the
    run began (default: now), for the report's ``seconds``.
    """
    t0 = started if started is not None else time.perf_counter()
    method = ACTIVATION_METHODS.get(config.method)()
    old = state_of(model)
    if old is not None:  # re-calibrating replaces the thresholds
        old.remove()
    sites = model_sites(model, method, config.include, config.exclude)
    greedy = _greedy_ids(ids, config.greedy_tokens) if config.allocation == "greedy" else None
    state = ActivationState(method.name, to_dict(config), {}, {})
    model.prunekit_activation = state
    records = calibrate(model, method, config, state, sites, ids, greedy, callback)
    total = sum(weight_view(m).numel() for m in decoder_linears(model).values())
    reached = {n: r["sparsity"] for n, r in records.items()}
    targets = {n: r["target"] for n, r in records.items()}
    weights = {n: s.skipped_params for n, s in state.sites.items()}
    state.report = {
        "method": method.name, "target": config.sparsity, "allocation": config.allocation,
        "sites": records, "seconds": time.perf_counter() - t0,
        "calibration": {"source": source, "nsamples": ids.shape[0],
                        "seqlen": ids.shape[1], "seed": config.calib.seed, "max_tokens": config.max_tokens},
        "mean_target": _weighted(targets, weights), "mean_sparsity": _weighted(reached, weights),
        "skipped_fraction": state.skipped_fraction(total, reached),
        "skipped_fraction_target": state.skipped_fraction(total, targets),
        "decoder_linear_params": total,
    }
    log.info("%s activation sparsity: %d sites, calibration sparsity %.4f (target %.4f), %.1f%% of decoder-linear "
             "weight reads skippable, %.1fs", method.name, len(state.sites), state.report["mean_sparsity"],
             config.sparsity, 100 * state.report["skipped_fraction"], state.report["seconds"])
    return state


def _weighted(values: dict[str, float | None], weights: dict[str, int]) -> float:
    tot = sum(weights[n] for n in values if values[n] is not None)
    return sum(values[n] * weights[n] for n in values if values[n] is not None) / tot if tot else 0.0


@torch.no_grad()
def measured_sparsity(model: nn.Module, ids: Tensor) -> float:
    """The installed thresholds' sparsity on ``ids`` (``[n, seqlen]``, one sequence per forward): the mean
    over sites weighted by the weight reads each lets a kernel skip, as the calibration report's
    ``mean_sparsity`` (e.g. what thresholds calibrated before training reach after it)."""
    state = state_of(model)
    counters = {}
    for name in state.sites:
        counters[name] = state.mask(name).counter = Counter()
    was_training, dev = model.training, model_device(model)
    model.eval()
    try:
        for row in ids:
            model(row[None].to(dev))
    finally:
        for name in state.sites:
            state.mask(name).counter = None
        model.train(was_training)
    weights = {n: s.skipped_params for n, s in state.sites.items()}
    return _weighted({n: c.sparsity for n, c in counters.items()}, weights)
