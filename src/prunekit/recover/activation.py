"""Activation thresholds through a recovery run: trained with them in place, re-calibrated after.

A model that carries activation thresholds (``model.prunekit_activation``: TEAL / CATS / CHESS /
WINA) trains with its masks in the forward pass — the hooks zero the small inputs, the gradient
flows through the entries they keep — so training learns to do without what the thresholds drop.
Training also moves the activations: the old thresholds then zero a different fraction than the
one they were calibrated for (usually less), so a model saved with them would claim a sparsity it
no longer has. After training, :func:`recalibrate` measures the sparsity the old thresholds reach on
the calibration text and calibrates them again, with the model's own settings, on the trained
weights: the saved model has the sparsity it says.
"""

from __future__ import annotations

import logging
import time

from torch import nn

from ..activation.api import activation_calibration, calibrate_thresholds, measured_sparsity
from ..models.activation import state_of

log = logging.getLogger(__name__)


def calibration_for(model: nn.Module, tokenizer, data_dir=None) -> tuple | None:
    """``(config, ids, source)`` to re-calibrate ``model``'s thresholds with, or ``None`` if it has none.

    Drawn before training, so a calibration text that cannot be read fails before any step, not after
    the training is done. The text and every setting are the model's own (``state.config``); a rotation
    is not repeated (the weights are already in the rotated basis).
    """
    from ..families.activation import ActivationSparsityConfig

    state = state_of(model)
    if state is None:
        return None
    cfg = ActivationSparsityConfig(**{**state.config, "rotate": "none"})
    if state.report.get("calibration", {}).get("source") == "given":
        log.warning("the activation thresholds were calibrated on token ids passed in; they are re-calibrated on "
                    "their config's text instead (%s, %d x %d)", cfg.calib.dataset, cfg.calib.nsamples,
                    cfg.calib.seqlen)
    ids, source = activation_calibration(model, cfg, None, tokenizer, data_dir)
    return cfg, ids, source


def recalibrate(model: nn.Module, prepared: tuple | None, keep: bool = False) -> dict | None:
    """Re-calibrate ``model``'s activation thresholds on its (trained) weights with ``prepared``
    (:func:`calibration_for`, taken before training); ``None`` when the model has no thresholds.

    Returns what the run's report records: the method and target, the sparsity the thresholds the
    model trained with reach now on the calibration text, and (unless ``keep``) the sparsity of the
    re-calibrated ones.
    """
    if prepared is None:
        return None
    t0 = time.perf_counter()
    cfg, ids, source = prepared
    old = measured_sparsity(model, ids)
    out = {"method": state_of(model).method, "target": cfg.sparsity, "calibration": source,
           "trained_thresholds_sparsity": old, "recalibrated": not keep}
    if keep:
        log.warning("activation thresholds kept as trained with: they now reach %.4f sparsity on the calibration "
                    "text (calibrated for %.4f)", old, cfg.sparsity)
        return out
    new = calibrate_thresholds(model, cfg, ids, source)
    out.update(sparsity=new.report["mean_sparsity"], skipped_fraction=new.report["skipped_fraction"],
               seconds=time.perf_counter() - t0)
    log.info("activation thresholds re-calibrated on the trained weights: %.4f -> %.4f sparsity (target %.4f)",
             old, out["sparsity"], cfg.sparsity)
    return out
