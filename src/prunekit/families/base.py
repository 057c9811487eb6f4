"""What every compression family shares: the common config fields, the handler interface, dispatch by type.

A family is a typed config (a frozen dataclass that validates itself) and one handler class
registered for that type. :func:`prepare` builds the handler — and with it every component the
family needs (method or criterion, allocator, refiner), once; :func:`compress` runs it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..data import CalibConfig, calibration_ids
from ..errors import ConfigError
from ..eval import check_seqlen
from ..masks import Pattern
from ..models import check_finite, decoder_linears, weight_view
from ..options import Options
from ..report import Report

log = logging.getLogger(__name__)


def check_fraction(name: str, value: Any, example: str = "0.5") -> float:
    """``value`` as a float in [0, 1), or a one-line :class:`ConfigError` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise ConfigError(f"{name}={value!r} is out of range: it must be a fraction in [0, 1), e.g. {example}")
    return float(value)


def typed_options(registry, name: str | None, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` checked and converted by the ``Options`` that ``name`` declares (keys as given, ``-`` → ``_``)."""
    raw = dict(raw)
    if name is None:
        return {}
    opts = registry.get(name).Options.parse(raw, f"{registry.kind} {name!r}")
    return {k.replace("-", "_"): getattr(opts, k.replace("-", "_")) for k in raw}


def no_options(raw: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """For a name that declares no options: ``{}``, or the one-line error of :meth:`Options.parse`."""
    Options.parse(raw, owner)
    return {}


@dataclass(frozen=True, kw_only=True)
class FamilyConfig:
    """Fields every family has: which linears (regexes on qualified names) and the calibration data."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    calib: CalibConfig = field(default_factory=CalibConfig)

    def __post_init__(self) -> None:
        for key in ("include", "exclude"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
            for rx in getattr(self, key):
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ConfigError(f"--{key} regex {rx!r} is invalid ({e}); fix it, e.g. 'mlp' or 'self_attn'") from None
        if not isinstance(self.calib, CalibConfig):
            object.__setattr__(self, "calib", CalibConfig(**dict(self.calib)))

    @property
    def pattern_obj(self) -> Pattern:
        return Pattern.parse(self.front()["pattern"])

    def front(self) -> dict[str, Any]:
        """This config in :class:`~prunekit.config.PruneConfig`'s terms (what reports record)."""
        raise NotImplementedError

    def _front(self, method: str, sparsity: float, pattern: str, allocation: str, method_options: Mapping[str, Any],
               allocation_options: Mapping[str, Any], refine: str | None,
               refine_options: Mapping[str, Any]) -> dict[str, Any]:
        """The dict ``to_dict(PruneConfig(...))`` gives, keys in its order."""
        return {"method": method, "sparsity": sparsity, "pattern": pattern, "allocation": allocation,
                "include": list(self.include), "exclude": list(self.exclude), "method_options": dict(method_options),
                "allocation_options": dict(allocation_options), "calib": dataclasses.asdict(self.calib),
                "refine": refine, "refine_options": dict(refine_options)}


#: config type -> handler class (one handler per family)
HANDLERS: dict[type, type["Family"]] = {}


def handles(config_type: type) -> Callable[[type["Family"]], type["Family"]]:
    """Class decorator: the handler of ``config_type`` (and of its subclasses)."""

    def deco(cls: type[Family]) -> type[Family]:
        HANDLERS[config_type] = cls
        cls.config_type = config_type
        return cls

    return deco


class Family(ABC):
    """One family's handler, bound to a config: its components are built once, in ``__init__``."""

    config_type: ClassVar[type] = FamilyConfig
    #: runs block by block from the checkpoint (``prunekit.prune_streamed``, ``--offload disk``)
    streams: ClassVar[bool] = True
    #: the save formats its result can be written in
    save_formats: ClassVar[tuple[str, ...]] = ("dense", "compressed")
    #: whole units are removed: the saved model is smaller, with no zeros left to store
    removes_units: ClassVar[bool] = False

    def __init__(self, config: FamilyConfig) -> None:
        self.config = config
        self.build()

    @abstractmethod
    def build(self) -> None:
        """Build the components (each exactly once) onto ``self``."""

    @property
    @abstractmethod
    def needs_calibration(self) -> bool:
        """Whether a run needs calibration token ids."""

    def save_format_refusal(self, save_format: str) -> str:
        """Why ``save_format`` (not in :attr:`save_formats`) does not fit this family's result."""
        return f"save format {save_format!r} is not one of: {', '.join(self.save_formats)}"

    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The linears the config selects, checked for the pattern's divisibility."""
        return select_linears(model, self.config)

    def check(self, model: nn.Module) -> dict[str, nn.Module]:
        """Everything about ``model`` that can fail before any work; the selected linears."""
        return self.select(model)

    def calibration(self, model: nn.Module, calib: Tensor | None, tokenizer, data_dir) -> tuple[Tensor | None, dict]:
        """The calibration ids (``None`` when nothing calibrates) and what the report says of them."""
        if not self.needs_calibration:
            return calib, {}
        ids, info = calibration(model, self.config, calib, tokenizer, data_dir)
        check_holdout(self.config, int(ids.shape[0]))  # in memory and streamed alike, before the first block
        return ids, info

    @abstractmethod
    def run(self, model: nn.Module, linears: dict[str, nn.Module], calib: Tensor | None, calib_info: dict,
            device, callback, started: float) -> Report:
        """Compress the checked ``linears`` of ``model`` in place."""

    def compress(self, model: nn.Module, calib: Tensor | None = None, tokenizer=None, device=None, callback=None,
                 data_dir=None) -> Report:
        """Check, calibrate and run: :func:`prunekit.compress` for this handler."""
        t0 = time.perf_counter()
        linears = self.check(model)
        check_finite(model)
        calib, calib_info = self.calibration(model, calib, tokenizer, data_dir)
        return self.run(model, linears, calib, calib_info, device, callback, t0)


def check_holdout(config, count: int) -> None:
    """A refiner's held-out calibration sequences (``reconstruct``'s ``holdout``) must leave some to fit on."""
    holdout = dict(getattr(config, "refine_options", None) or {}).get("holdout", 0)
    if holdout and holdout >= count:
        raise ConfigError(f"--refine-option holdout={holdout} leaves none of the {count} calibration sequences to "
                          f"fit on: use a holdout below {count}, or raise --nsamples")


def handler_class(config: FamilyConfig) -> type[Family]:
    for cls in type(config).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    known = ", ".join(sorted(t.__name__ for t in HANDLERS))
    raise ConfigError(f"{type(config).__name__} is not a compression family config; pass one of: {known}")


def prepare(config: FamilyConfig | Family) -> Family:
    """The handler for ``config``'s type, its components built (a handler is returned as it is)."""
    if isinstance(config, Family):
        return config
    if not isinstance(config, FamilyConfig) and callable(getattr(config, "family", None)):
        config = config.family()  # PruneConfig, the flat compatible front
    return handler_class(config)(config)


def compress(model: nn.Module, config, calib: Tensor | None = None, tokenizer=None,
             device: torch.device | str | None = None, callback=None, data_dir=None) -> Report:
    """Compress ``model`` in place by the family ``config``'s type names; return the :class:`Report`.

    Args:
        model: a Hugging Face causal LM.
        config: a family config (:class:`SparseConfig`, :class:`StructuredConfig`, :class:`LowRankConfig`,
            :class:`ActivationSparsityConfig`), a :class:`~prunekit.config.PruneConfig`, or a handler from
            :func:`prepare`.
        calib: calibration token ids ``[n, seqlen]``; ``None``: drawn from ``config.calib`` with ``tokenizer``.
        tokenizer: needed only when ``calib`` is ``None`` and the family calibrates.
        device: compute device (``None`` = the model's device).
        callback: called after each block (progress bars).
        data_dir: where local dataset copies are (``None``: ``$PRUNEKIT_DATA``).
    """
    return prepare(config).compress(model, calib, tokenizer, device, callback, data_dir)


def select_linears(model: nn.Module, config: FamilyConfig) -> dict[str, nn.Module]:
    """The linears ``config`` selects, checked for N:M divisibility."""
    linears = decoder_linears(model, config.include, config.exclude)
    if not linears:
        raise ConfigError(
            f"no linear layer matches include={list(config.include)} exclude={list(config.exclude)}; "
            "loosen the regexes (they are matched with re.search on names like model.layers.0.mlp.up_proj)"
        )
    pattern = config.pattern_obj
    for name, mod in linears.items():
        pattern.check_width(weight_view(mod).shape[1], name)
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


def calibration(model: nn.Module, config: FamilyConfig, calib: Tensor | None, tokenizer,
                data_dir) -> tuple[Tensor, dict]:
    """The calibration ids (given, or drawn from ``config.calib``) and what the report says of them."""
    info: dict = {}
    if calib is None:
        if tokenizer is None:
            raise ConfigError(f"method {config.front()['method']!r} needs calibration: pass calib token ids or a "
                              "tokenizer")
        check_seqlen(model, config.calib.seqlen, "calibration seqlen")
        calib = calibration_ids(config.calib, tokenizer, data_dir)
        info = {"source": config.calib.dataset, "seed": config.calib.seed}
    calib = _check_calib(calib, model)
    info.update(nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=config.calib.batch_size)
    return calib, info
