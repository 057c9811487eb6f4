"""Activation sparsity (TEAL, CATS, CHESS, WINA): thresholds calibrated on text, applied at inference.

:func:`sparsify_activations` calibrates and installs the thresholds (the masked model, for
measuring quality exactly); :class:`~prunekit.families.ActivationSparsityConfig` makes it a
compression family (``prunekit.compress``); :mod:`prunekit.formats.activation` saves them beside
the weights and ``load_model`` installs them again; :mod:`prunekit.kernels` runs them with CPU
kernels that skip the weights of zero activations.
"""

from .._deprecated import moved
from ..models.activation import ActivationState, Site, state_of
from . import cats, chess, teal, wina  # noqa: F401  (self-registering)
from .api import (activation_calibration, calibrate_thresholds, check_activation, rotate_then_calibrate,
                  sparsify_activations)
from .base import ACTIVATION_METHODS

__all__ = ["ACTIVATION_METHODS", "ActivationState", "Site", "activation_calibration", "calibrate_thresholds",
           "check_activation", "rotate_then_calibrate", "sparsify_activations", "state_of"]

#: the side-file names and functions, now the registered format prunekit.formats.activation
_MOVED = ("MANIFEST", "TENSORS", "attach_saved", "has_saved", "read_side_files", "save_with_thresholds",
          "write_side_files")


def __getattr__(name: str):
    """The side files moved to :mod:`prunekit.formats.activation` (deprecated here)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..formats import activation

    return moved(__name__, name, activation)
