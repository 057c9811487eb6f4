"""What one run is asked to do (:class:`RunSpec`) and what it gives back (:class:`RunResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

OFFLOAD = ("auto", "none", "disk")


@dataclass
class RunSpec:
    """One prune → evaluate → save → report run, checked field by field when it is made.

    Attributes:
        model: HF folder, ``.gguf`` file, hub id or alias; or a model already in memory (an
            ``nn.Module``, compressed in place: nothing is loaded, and it is never streamed), with
            ``tokenizer`` and optionally ``model_name`` (what the report calls it; default: its
            ``config.name_or_path``).
        compression: a :class:`~prunekit.config.PruneConfig`, a weight family config (``SparseConfig`` …)
            or a handler from :func:`prunekit.families.prepare`; ``None`` when only activations are
            sparsified. An ``ActivationSparsityConfig`` given here alone is taken as ``activation``.
        activation: an :class:`~prunekit.families.ActivationSparsityConfig` (the activation family:
            thresholds calibrated after the weights are compressed, in the same run), or ``None``.
        calib_ids: calibration token ids ``[n, seqlen]`` already drawn for the weight compression
            (a sweep draws them once per source); ``None``: drawn from its ``calib`` settings.
        eval_datasets: perplexity datasets; ``eval_seqlen`` ``None``: the calibration seqlen.
        dense_eval: score the dense model first (the baseline the report compares with).
        tasks / task_settings: downstream task names, or tasks already prepared
            (``{spec: Task}`` from ``prepare_tasks``), and their settings (``None``: defaults).
        out / save_format / overwrite / merge_lowrank: where and how the result is saved (atomically).
        report_json: also write the report JSON to this file.
        offload: ``disk``: stream the model one block at a time; ``none``: in memory; ``auto``: stream
            only when it would not fit in memory.
        recover: a :class:`~prunekit.recover.RecoverConfig` to train the compressed model back after
            the prune (in memory only), or ``None``.
        dtype / device / threads / trust_remote_code / allow_pickle / data_dir: as for ``load_model``
            (a loaded model is used as it is: ``dtype`` becomes the dtype it has).
    """

    model: Any
    compression: Any = None
    activation: Any = None
    tokenizer: Any = None
    model_name: str | None = None
    calib_ids: Any = None
    eval_datasets: tuple[str, ...] = ("wikitext2",)
    eval_seqlen: int | None = None
    max_windows: int | None = None
    eval_batch_size: int = 1
    dense_eval: bool = True
    tasks: tuple[str, ...] | Mapping[str, Any] = ()
    task_settings: Any = None
    out: str | Path | None = None
    save_format: str = "dense"
    overwrite: bool = False
    merge_lowrank: bool = False
    report_json: str | Path | None = None
    offload: str = "auto"
    recover: Any = None
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    data_dir: str | Path | None = None

    def __post_init__(self) -> None:
        from ..formats import SAVE_FORMATS

        from ..families import ActivationFamily, ActivationSparsityConfig

        self.eval_datasets = tuple(self.eval_datasets)
        if not isinstance(self.tasks, Mapping):  # names; a mapping holds tasks already prepared
            self.tasks = tuple(self.tasks)
        if isinstance(self.compression, ActivationFamily):
            self.compression = self.compression.config
        if isinstance(self.compression, ActivationSparsityConfig):  # the activation family alone
            if self.activation is not None:
                raise ConfigError("compression is an ActivationSparsityConfig and activation is given too: give the "
                                  "weight compression as compression=..., the activation sparsity as activation=...")
            self.compression, self.activation = None, self.compression
        if self.activation is not None and not isinstance(self.activation, ActivationSparsityConfig):
            raise ConfigError(f"activation={type(self.activation).__name__} is not an ActivationSparsityConfig: give "
                              "e.g. activation=ActivationSparsityConfig(sparsity=0.4), or None")
        self._check_model()
        if self.compression is None and self.activation is None:
            raise ConfigError("nothing to do: give a compression config, an activation sparsity config, or both")
        if self.offload not in OFFLOAD:
            raise ConfigError(f"offload={self.offload!r} is not one of {', '.join(OFFLOAD)}")
        if self.save_format not in SAVE_FORMATS:
            raise ConfigError(f"save_format={self.save_format!r} is not one of {', '.join(SAVE_FORMATS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads={self.threads} is invalid: give a positive number of CPU threads, "
                              "e.g. --threads 2")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"--max-windows={self.max_windows} must be >= 1")
        if self.calib_ids is not None and self.compression is None:
            raise ConfigError("calib_ids are the weight compression's calibration, and there is none: drop calib_ids "
                              "(activation sparsity draws its own from its calib settings)")

    def _check_model(self) -> None:
        """A name to load, or a loaded model with its tokenizer (in memory: never streamed)."""
        from torch import nn

        if isinstance(self.model, nn.Module):
            if self.tokenizer is None:
                raise ConfigError("a loaded model needs its tokenizer: RunSpec(model, tokenizer=tok, ...)")
            if self.offload == "disk":
                raise ConfigError("offload='disk' streams a model from its checkpoint; this one is already in memory: "
                                  "use offload='none', or give the model's folder instead")
            param = next(self.model.parameters(), None)
            if param is not None:
                self.dtype = str(param.dtype).replace("torch.", "")
            return
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model {self.model!r} is not a model: give a folder, .gguf file, hub id or alias, or a "
                              "loaded model with its tokenizer")
        if self.tokenizer is not None:
            raise ConfigError(f"tokenizer= goes with a loaded model; model {self.model!r} is loaded with its own: drop "
                              "tokenizer=")

    @property
    def loaded(self) -> bool:
        """The model was given in memory (nothing to load)."""
        return not isinstance(self.model, str)

    @property
    def name(self) -> str:
        """What the report calls the model: ``model_name``, the name it was loaded by, or its config's path."""
        if self.model_name:
            return self.model_name
        if not self.loaded:
            return self.model
        return getattr(getattr(self.model, "config", None), "name_or_path", "") or type(self.model).__name__

    @property
    def source(self) -> str | None:
        """The name the model is loaded from (``None`` for a loaded model)."""
        return None if self.loaded else self.model

    @property
    def calib(self):
        """The calibration settings: the compression's, else the activation sparsity's."""
        config = self.compression
        if config is not None:
            return getattr(config, "calib", None) or config.config.calib  # a handler keeps its config
        return self.activation.calib

    @property
    def seqlen(self) -> int:
        """The perplexity window: ``eval_seqlen``, else the calibration seqlen."""
        return self.eval_seqlen or self.calib.seqlen

    @property
    def seqlen_flag(self) -> str:
        """The flag a too-long evaluation window is reported under."""
        return "--eval-seqlen" if self.eval_seqlen else "--seqlen"


@dataclass
class RunResult:
    """What :func:`prunekit.pipeline.run` did.

    ``model`` / ``tokenizer``: the compressed model in memory (``None`` when streamed: it is in ``saved``).
    ``dense`` / ``compressed``: perplexity per dataset; ``dense_tasks`` / ``tasks``: task results.
    ``saved``: the output folder (``None`` without ``out``); ``saved_how``: what was written there.
    ``seconds``: wall time of the steps that ran in memory (``load``, ``compress``: weights and
    activations, ``evaluate``: the compressed model's scores).
    """

    report: Any
    dense: dict = field(default_factory=dict)
    compressed: dict = field(default_factory=dict)
    dense_tasks: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    streamed: bool = False
    model: Any = None
    tokenizer: Any = None
    recovered: dict = field(default_factory=dict)
    saved: Path | None = None
    saved_how: str = ""
    seconds: dict = field(default_factory=dict)
