"""Activation sparsity (TEAL, CATS, CHESS): thresholds calibrated on text, applied at inference.

:func:`sparsify_activations` calibrates and installs the thresholds (the masked model, for
measuring quality exactly); :mod:`prunekit.kernels` runs them with CPU kernels that skip the
weights of zero activations.
"""

from . import cats, chess, teal  # noqa: F401  (self-registering)
from .api import check_activation, sparsify_activations
from ..models.activation import ActivationState, Site, state_of
from .base import ACTIVATION_METHODS
from .io import MANIFEST, TENSORS, attach_saved, has_saved, read_side_files, save_with_thresholds, write_side_files

from ..formats.load import LOAD_HOOKS

if attach_saved not in LOAD_HOOKS:
    LOAD_HOOKS.append(attach_saved)

__all__ = ["ACTIVATION_METHODS", "ActivationState", "MANIFEST", "Site", "TENSORS", "attach_saved", "check_activation",
           "has_saved", "read_side_files", "save_with_thresholds", "sparsify_activations", "state_of",
           "write_side_files"]
