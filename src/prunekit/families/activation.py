"""The activation family: thresholds on activations (TEAL, CATS, CHESS, WINA), calibrated and installed.

The weights are untouched, unless ``rotate="pca"`` first rotates the residual stream (an exact
re-parametrisation: the same function, other weights).

:class:`ActivationSparsityConfig` says what; :class:`ActivationFamily` runs :mod:`prunekit.activation`'s
two halves as its calibration and run steps (the ids; the thresholds, installed on the model as
``model.prunekit_activation``) and returns a :class:`~prunekit.report.Report` like every family's: the
weights' fields say nothing was pruned (``method="none"``), ``report.extra["activation"]`` holds the
thresholds' summary (per site, mean sparsity reached, the fraction of weight reads a kernel skips).

It layers on a weight family: compress with a ``SparseConfig`` (or any), then with this config — the
thresholds are calibrated on the compressed weights (``prunekit.pipeline.run`` does both in one run).
The thresholds are saved beside the weights by :mod:`prunekit.formats.activation`.

Unlike the weight families' configs it is not a :class:`~.base.FamilyConfig`: its ``include`` /
``exclude`` select activation *sites* (not linears checked for a weight pattern), and its fields and
their order are what saved manifests and reports have always recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..activation import activation_calibration, check_activation, rotate_then_calibrate
from ..data import CalibConfig
from ..errors import ConfigError
from ..models.activation import ActivationState
from ..options import check_int as _check_int
from ..registry import ACTIVATION_METHODS
from ..report import Report
from .base import Family, handles


@dataclass(frozen=True)
class ActivationSparsityConfig:
    """Training-free activation sparsity: zero the small entries of activations at inference.

    Attributes:
        sparsity: target fraction of the thresholded activations that are zero, in [0, 1). For
            ``teal`` / ``wina`` it is the parameter-weighted mean over every decoder linear's input (the
            fraction of weight reads a sparse kernel skips); for ``cats`` / ``chess`` the fraction
            of the gated MLP's intermediate channels (and, for ``chess``, of the q/o inputs).
        method: registered activation method: ``teal`` (every linear's input, one threshold per
            linear), ``cats`` (the gate activation of the MLP), ``chess`` (channel-wise gate
            thresholds plus the inputs of q and o), ``wina`` (every linear's input, scored by
            ``|x_i|`` times the norm of weight column ``i``: one threshold per input channel).
        allocation: ``uniform`` (every site at ``sparsity``) or ``greedy`` (TEAL's block-wise
            greedy search; ``teal`` and ``wina``).
        calib: calibration text (thresholds are quantiles of its activations).
        max_tokens: calibration tokens sampled per site for the quantiles (evenly spread, seeded).
        greedy_tokens: tokens of the first calibration sequence the greedy search scores blocks on.
        greedy_step: the greedy search's step, in effective sparsity of one average linear.
        propagate: calibrate block i+1 on block i's sparsified outputs (what inference sees);
            ``False``: every block on the dense model's activations (TEAL's reference code).
        include / exclude: regexes on qualified names of the sites (linears for ``teal``).
        rotate: ``"none"``, or ``"pca"``: first rotate the residual stream into the principal axes of the
            calibration activations (:mod:`prunekit.activation.rotate`; folded into the weights, nothing
            added at decode; dense pre-norm models such as Llama / Qwen2 / Mistral; the LM head is untied).
    """

    sparsity: float = 0.4
    method: str = "teal"
    allocation: str = "uniform"
    calib: CalibConfig = field(default_factory=CalibConfig)
    max_tokens: int = 4096
    greedy_tokens: int = 512
    greedy_step: float = 0.05
    propagate: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rotate: str = "none"

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= float(s) < 1.0):
            raise ConfigError(f"activation sparsity={s!r} is out of range: it must be a fraction in [0, 1), e.g. 0.4")
        object.__setattr__(self, "sparsity", float(s))
        object.__setattr__(self, "method", str(self.method).lower())
        ACTIVATION_METHODS.get(self.method)  # unknown name: one line naming the choices
        if self.allocation not in ("uniform", "greedy"):
            raise ConfigError(f"activation allocation={self.allocation!r} is unknown; choose uniform or greedy")
        if self.allocation == "greedy" and not ACTIVATION_METHODS.get(self.method).supports_greedy:
            greedy = [n for n in ACTIVATION_METHODS.names() if ACTIVATION_METHODS.get(n).supports_greedy]
            raise ConfigError(f"activation allocation 'greedy' works with method {' or '.join(greedy)}, not "
                              f"{self.method!r}; "
                              "use --act-allocation uniform or --act-method teal")
        if not isinstance(self.calib, CalibConfig):
            object.__setattr__(self, "calib", CalibConfig(**dict(self.calib)))
        _check_int("activation max_tokens", self.max_tokens, 16)
        _check_int("activation greedy_tokens", self.greedy_tokens, 2)
        g = self.greedy_step
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (0.0 < float(g) <= 0.5):
            raise ConfigError(f"activation greedy_step={g!r} is out of range: it must be in (0, 0.5], e.g. 0.05")
        if self.rotate not in ("none", "pca"):
            raise ConfigError(f"activation rotate={self.rotate!r} is unknown; choose none or pca")
        for key in ("include", "exclude"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
            for rx in getattr(self, key):
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ConfigError(f"activation {key} regex {rx!r} is invalid ({e}); fix it, e.g. 'mlp'") from None


def activation_report(state: ActivationState) -> Report:
    """The :class:`Report` of a run that calibrated thresholds and pruned no weights."""
    report = Report(method="none", target_sparsity=0.0, pattern="unstructured", seconds=state.report["seconds"],
                    calibration=state.report["calibration"])
    report.extra["activation"] = state.report
    return report


@handles(ActivationSparsityConfig)
class ActivationFamily(Family):
    """Calibrate the thresholds on the model as it is (dense or compressed) and install them."""

    streams = False  # calibration propagates through the whole model in memory
    #: the weights are saved as they are (dense or compressed), the thresholds beside them
    save_formats = ("dense", "compressed")

    def build(self) -> None:
        """Nothing to share between runs: each calibration builds its method from the registry."""

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, model: nn.Module) -> dict[str, nn.Module]:
        """The sites the config selects exist (cats / chess: a gated MLP) and a rotation's architecture is
        accepted; no linear is changed, so ``{}``."""
        check_activation(model, self.config)
        return {}

    def calibration(self, model: nn.Module, calib: Tensor | None, tokenizer, data_dir) -> tuple[Tensor, dict]:
        ids, source = activation_calibration(model, self.config, calib, tokenizer, data_dir)
        return ids, {"source": source}

    def run(self, model: nn.Module, linears: dict[str, nn.Module], calib: Tensor, calib_info: dict, device,
            callback, started: float) -> Report:
        state = rotate_then_calibrate(model, self.config, calib, calib_info["source"], callback, started)
        return activation_report(state)
