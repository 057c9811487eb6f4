"""The frozen, validated settings of a recovery run (:class:`RecoverConfig`).

Every check raises :class:`~prunekit.errors.ConfigError` naming the field, the bad value and
what is allowed, before any model is touched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

TRAINABLE = ("full", "lora")
OPTIMIZERS = ("adamw", "galore", "spam")
SCHEDULES = ("cosine", "linear", "constant")
TEACHER_DTYPES = ("auto", "float32", "bfloat16")


def _int(name: str, value: Any, lo: int, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= {lo}{fix}")


def _float(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ConfigError(f"{name}={value!r} is invalid: it must be a number in {rng}")


def _flag(default: Any, help: str, **cli: Any) -> Any:
    """A field that is also a command-line flag. Its metadata holds the flag's ``help`` and, where needed,
    ``choices`` and ``flag`` (when the flag is not ``--field-name``); the flag's type and nargs follow from
    the default. ``prunekit.cli.recover`` builds the flags and the config from these fields alone."""
    return dataclasses.field(default=default, metadata={"cli": {"help": help, **cli}})


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class RecoverConfig:
    """How to train a compressed student back towards its dense teacher.

    Attributes:
        data: training text: a registered dataset (``austen``, ``gsm8k`` …; its *training* split)
            or a ``.txt`` / ``.jsonl`` path. Evaluation splits (files named ``test``) are refused.
        text_field: JSONL field holding the text.
        tokens: training budget in tokens; the run takes ``ceil(tokens / tokens_per_step)`` steps.
        seqlen: tokens per training window (the text is packed into non-overlapping windows).
        batch_size: windows per forward/backward (micro-batch).
        grad_accum: micro-batches per optimizer step.
        val_windows: windows held out of the training text for validation (never trained on).
        val_every: validate every N optimizer steps (0: only before and after training).
        kl_weight: weight of the distillation loss ``T^2 KL(p_teacher || p_student)`` (Hinton et al. 2015).
        ce_weight: weight of the next-token cross-entropy on the training text.
        hidden_weight: weight of the mean-squared error between student and teacher hidden states.
        temperature: distillation temperature ``T``.
        hidden_layers: indices into the models' ``hidden_states`` tuple to match (default: the last).
        loss_chunk: positions per chunk of full-vocabulary logits (bounds their memory).
        trainable: ``full`` (every block parameter, pruned positions held at zero) or ``lora``.
        train_embeddings: also train the token embeddings / LM head (``full`` only).
        lora_rank / lora_alpha / lora_dropout: the LoRA adapters (Hu et al. 2021); scale = alpha / rank.
        optimizer: ``adamw``, ``galore`` (Zhao et al. 2024) or ``spam`` (Huang et al. 2025).
        lr / weight_decay / betas / eps: optimizer settings (weight decay on matrices only).
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        warmup_ratio: fraction of the steps with a linear learning-rate warm-up.
        schedule: decay after warm-up: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: the decayed learning rate ends at ``lr * min_lr_ratio``.
        galore_rank / galore_update_gap / galore_scale: GaLore's projection rank r, the steps T
            between SVDs of the gradient, and the scale alpha of the projected-back update.
        spam_threshold / spam_reset_interval / spam_warmup / spam_clip_delay: SPAM's spike
            threshold theta, the momentum-reset interval Delta T (0: never), the cosine
            warm-up steps N after each reset, and the steps after a reset before clipping starts.
        bf16: run the student's forward/backward under bfloat16 autocast (weights stay float32).
        teacher_dtype: ``auto`` (bfloat16 where the CPU/GPU has bf16 matmul units), ``float32``
            or ``bfloat16``.
        seed: data order, LoRA initialisation and every other random draw.
        act_keep_thresholds: a student carrying activation thresholds trains with them in place; after
            training they are re-calibrated on the trained weights (:mod:`prunekit.recover.activation`)
            unless this is set, which keeps the thresholds it trained with (their sparsity is reported).
        checkpoint_every: write a resumable checkpoint every N optimizer steps (0: never).
    """

    data: str = _flag("austen", "training text: registered dataset (its training split) or .txt/.jsonl file "
                      "(default austen); never an evaluation split")
    text_field: str = _flag("text", "JSONL field holding the text (default text)")
    tokens: int = _flag(262_144, "training budget in tokens (default 262144)")
    seqlen: int = _flag(1024, "tokens per training window (default 1024)")
    batch_size: int = _flag(1, "windows per forward/backward (default 1)")
    grad_accum: int = _flag(8, "micro-batches per optimizer step (default 8)")
    val_windows: int = _flag(8, "held-out windows for validation (default 8)")
    val_every: int = _flag(0, "validate every N steps (default: before/after only)")
    kl_weight: float = _flag(1.0, "weight of T^2*KL distillation (default 1)")
    ce_weight: float = _flag(0.0, "weight of next-token cross-entropy (default 0)")
    hidden_weight: float = _flag(0.0, "weight of hidden-state MSE (default 0)")
    temperature: float = _flag(1.0, "distillation temperature T (default 1)")
    hidden_layers: tuple[int, ...] = _flag((-1,), "hidden states to match (default -1)")
    loss_chunk: int = _flag(256, "positions per logits chunk (default 256)")
    trainable: str = _flag("full", "full (masked) or lora (default full)", choices=TRAINABLE)
    train_embeddings: bool = _flag(False, "also train embeddings / LM head")
    lora_rank: int = _flag(16, "LoRA rank (default 16)")
    lora_alpha: float = _flag(32.0, "LoRA alpha (default 32)")
    lora_dropout: float = _flag(0.0, "LoRA dropout (default 0)")
    optimizer: str = _flag("adamw", "adamw, galore or spam (default adamw)", choices=OPTIMIZERS)
    lr: float = _flag(1e-4, "peak learning rate (default 1e-4)")
    weight_decay: float = _flag(0.0, "decoupled weight decay on matrices (default 0)")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = _flag(1.0, "gradient-norm clip (default 1)")
    warmup_ratio: float = _flag(0.05, "fraction of steps of linear warm-up (default 0.05)")
    schedule: str = _flag("cosine", "decay after warm-up (default cosine)", choices=SCHEDULES)
    min_lr_ratio: float = _flag(0.1, "final lr / peak lr (default 0.1)")
    galore_rank: int = _flag(128, "GaLore projection rank (default 128)")
    galore_update_gap: int = _flag(200, "steps between GaLore SVDs (default 200)")
    galore_scale: float = _flag(1.0, "GaLore update scale alpha (default 1)")
    spam_threshold: float = _flag(5000.0, "SPAM spike threshold theta (default 5000)")
    spam_reset_interval: int = _flag(500, "SPAM momentum reset interval (default 500)")
    spam_warmup: int = _flag(150, "SPAM warm-up steps after a reset (default 150)")
    spam_clip_delay: int = _flag(20, "steps after a reset before clipping (default 20)")
    bf16: bool = _flag(False, "bfloat16 autocast for the student's compute")
    teacher_dtype: str = _flag("auto", "teacher weights dtype (default auto: bfloat16 where the CPU has bf16 units)",
                               choices=TEACHER_DTYPES)
    seed: int = _flag(0, "seed of data order and LoRA init (default 0)")
    act_keep_thresholds: bool = _flag(False, "keep a model's activation thresholds as trained with (default: "
                                      "re-calibrate them on the trained weights, the sparsity they claim)")
    checkpoint_every: int = _flag(0, "write a resumable checkpoint beside --out every N steps (default: never)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_layers", tuple(self.hidden_layers))
        object.__setattr__(self, "betas", tuple(self.betas))
        if not isinstance(self.data, str) or not self.data.strip():
            raise ConfigError("data is empty: pass a dataset name (see `prunekit ls`) or a .txt/.jsonl file")
        _int("tokens", self.tokens, 1, " (the training budget in tokens, e.g. --tokens 262144)")
        _int("seqlen", self.seqlen, 2)
        _int("batch_size", self.batch_size, 1)
        _int("grad_accum", self.grad_accum, 1)
        _int("val_windows", self.val_windows, 1)
        _int("val_every", self.val_every, 0)
        _int("loss_chunk", self.loss_chunk, 1)
        _int("checkpoint_every", self.checkpoint_every, 0)
        _int("seed", self.seed, 0)
        for name in ("kl_weight", "ce_weight", "hidden_weight"):
            _float(name, getattr(self, name), 0.0)
        if self.kl_weight == self.ce_weight == self.hidden_weight == 0:
            raise ConfigError("kl_weight, ce_weight and hidden_weight are all 0: give at least one objective a weight")
        _float("temperature", self.temperature, 0.0, lo_open=True)
        if not self.hidden_layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.hidden_layers):
            raise ConfigError(f"hidden_layers={self.hidden_layers!r} must be a non-empty list of integers (-1: last)")
        _choice("trainable", self.trainable, TRAINABLE)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        if self.trainable == "lora":
            _int("lora_rank", self.lora_rank, 1)
            _float("lora_alpha", self.lora_alpha, 0.0, lo_open=True)
            _float("lora_dropout", self.lora_dropout, 0.0, 1.0, hi_open=True)
            if self.train_embeddings:
                raise ConfigError("train_embeddings=True needs trainable='full' (LoRA adapts the block linears only)")
            if self.optimizer == "galore":
                raise ConfigError("optimizer='galore' projects full weight gradients; with trainable='lora' "
                                  "use adamw or spam (LoRA already trains in a low-rank space)")
        _float("lr", self.lr, 0.0, lo_open=True)
        _float("weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2:
            raise ConfigError(f"betas={self.betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999)")
        for b in self.betas:
            _float("betas", b, 0.0, 1.0, hi_open=True)
        _float("eps", self.eps, 0.0, lo_open=True)
        if self.max_grad_norm is not None:
            _float("max_grad_norm", self.max_grad_norm, 0.0, lo_open=True)
        _float("warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        _float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _int("galore_rank", self.galore_rank, 1)
        _int("galore_update_gap", self.galore_update_gap, 1)
        _float("galore_scale", self.galore_scale, 0.0, lo_open=True)
        _float("spam_threshold", self.spam_threshold, 0.0)
        _int("spam_reset_interval", self.spam_reset_interval, 0)
        _int("spam_warmup", self.spam_warmup, 0)
        _int("spam_clip_delay", self.spam_clip_delay, 0)

    @property
    def tokens_per_step(self) -> int:
        return self.seqlen * self.batch_size * self.grad_accum

    @property
    def steps(self) -> int:
        """Optimizer steps the token budget buys (rounded up: the budget is a minimum)."""
        return -(-self.tokens // self.tokens_per_step)

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0 or self.hidden_weight > 0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def trajectory_fields(self) -> dict[str, Any]:
        """Settings that change the training trajectory (a checkpoint must agree on all of them)."""
        skip = {"checkpoint_every", "val_every", "act_keep_thresholds"}
        return {k: v for k, v in self.to_dict().items() if k not in skip}
