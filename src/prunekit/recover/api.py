"""``prunekit.recover``: train a compressed model back towards its dense teacher, keeping the compression.

    student, tok = prunekit.load_model("out/smollm2-wanda50")
    teacher, _ = prunekit.load_model("smollm2-135m")
    report = prunekit.recover(student, teacher, tok, prunekit.RecoverConfig(data="austen", tokens=262_144))
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..calibration import peak_rss_mb
from ..errors import ConfigError
from ..models import context_length, cpu_has_bf16, decoder_linears, fast_amp
from ..models.activation import state_of
from ..report import environment
from .activation import calibration_for, recalibrate
from .config import RecoverConfig
from .data import training_text
from .masks import MaskSet, sparsity_stats
from .objectives import Objective
from .trainer import StepInfo, Trainer

log = logging.getLogger(__name__)


@dataclass
class RecoverReport:
    """What a recovery run did and what it cost; ``to_json`` is saved beside the model."""

    config: dict[str, Any]
    data: dict[str, Any]
    trainable_params: int
    teacher_dtype: str | None
    steps: int
    tokens: int
    seconds: float
    wall_seconds: float
    tokens_per_s: float
    peak_rss_mb: float
    optimizer_state_bytes: int
    mask_bytes: int
    sparsity_before: dict[str, Any]
    sparsity_after: dict[str, Any]
    masks_kept: bool
    validation_before: dict[str, Any]
    validation_after: dict[str, Any]
    resumed_from: int | None = None
    lora: dict[str, Any] | None = None
    activation: dict[str, Any] | None = None  # the activation thresholds, re-calibrated after training
    evaluation: dict[str, Any] = field(default_factory=dict)
    validation: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=environment)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)


def teacher_dtype(cfg: RecoverConfig, device: torch.device) -> torch.dtype:
    if cfg.teacher_dtype == "float32":
        return torch.float32
    if cfg.teacher_dtype == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if fast_amp(device) == "bf16" else torch.float32


def vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_models(student: nn.Module, teacher: nn.Module | None, tokenizer, cfg: RecoverConfig) -> None:
    """Everything about the models that can be wrong, checked before any data or training."""
    p = next(student.parameters())
    if p.dtype != torch.float32:
        raise ConfigError(f"the student's weights are {str(p.dtype).replace('torch.', '')}; training needs float32 "
                          "master weights — load it with dtype float32 (bf16 compute: --bf16)")
    if cfg.bf16 and p.device.type == "cpu" and not cpu_has_bf16():
        log.warning("recover: --bf16 on a CPU without AVX-512 BF16 / AMX runs torch's generic bf16 loops "
                    "(a block's backward measured 17x slower than float32 here); drop --bf16 on this machine")
    limit = context_length(student)
    if limit is not None and cfg.seqlen > limit:
        raise ConfigError(f"seqlen={cfg.seqlen} exceeds the student's context length {limit}; use --seqlen <= {limit}")
    vs = vocab_size(student)
    if tokenizer is not None and vs is not None and len(tokenizer) > vs:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocabulary is {vs}; "
                          "use the student's own tokenizer")
    act = state_of(student)
    if cfg.trainable == "lora" and act is not None and any(site.kind == "input" for site in act.sites.values()):
        raise ConfigError(f"trainable='lora' with {act.method} activation thresholds on linear inputs: the adapters "
                          "would read the unthresholded inputs the merged model never sees; use --trainable full")
    if cfg.needs_teacher:
        if teacher is None:
            raise ConfigError("distillation (kl_weight/hidden_weight > 0) needs a teacher: pass --teacher DENSE, "
                              "or train on next-token loss alone with --kl-weight 0 --ce-weight 1")
        vt = vocab_size(teacher)
        if vt != vs:
            raise ConfigError(f"teacher and student vocabularies differ ({vt} vs {vs} tokens): distillation compares "
                              "logits token by token, so the teacher must be the student's own dense model "
                              "(same tokenizer)")


def _prepare_teacher(student: nn.Module, teacher: nn.Module | None, config: RecoverConfig) -> str | None:
    """Cast the teacher to its dtype and put it in eval mode; returns the dtype's name (``None``: no teacher)."""
    if teacher is None or not config.needs_teacher:
        return None
    dt = teacher_dtype(config, next(student.parameters()).device)
    teacher.to(dt).eval()  # it only runs under inference_mode: no graph, no gradients
    return str(dt).replace("torch.", "")


def _trainable(student: nn.Module, linear_names: list[str], config: RecoverConfig) -> list[tuple[str, nn.Parameter]]:
    """The parameters the optimizer updates: LoRA adapters on the decoder linears, or the full set."""
    if config.trainable == "lora":
        from .lora import add_lora

        return add_lora(student, linear_names, config)
    return _trainable_full(student, config)


def _merge_lora(student, teacher, objective, text, masks, config, evaluate, evaluation: dict):
    """Merge the adapters through the masks; returns the LoRA facts and an objective on the merged student."""
    from .lora import merge_lora

    val_unmasked = objective.evaluate(text.val, config.batch_size)
    if evaluate:
        evaluation["unmasked_merge"] = evaluate(student)
    info = {**merge_lora(student, masks, masked=True), "validation_unmasked": val_unmasked}
    return info, Objective(config, student, teacher)


def _trainable_full(model: nn.Module, cfg: RecoverConfig) -> list[tuple[str, nn.Parameter]]:
    """Every parameter except the token embeddings / LM head (unless ``train_embeddings``)."""
    frozen = set()
    if not cfg.train_embeddings:
        for mod in (model.get_input_embeddings(), model.get_output_embeddings()):
            if mod is not None:
                frozen.update(id(p) for p in mod.parameters())
    named = []
    for n, p in model.named_parameters():
        train = id(p) not in frozen
        p.requires_grad_(train)
        if train:
            named.append((n, p))
    return named


def _restore(student: nn.Module, flags: dict[str, bool], masks: MaskSet) -> dict[str, int]:
    """Give the parameters back their ``requires_grad``; the layers whose pruned positions became non-zero."""
    for n, p in student.named_parameters():
        p.requires_grad_(flags.get(n, True))
    bad = masks.violations()
    if bad:
        log.error("pruned positions became non-zero in %d layers: %s", len(bad), dict(list(bad.items())[:3]))
    return bad


def recover(student: nn.Module, teacher: nn.Module | None, tokenizer, config: RecoverConfig, *,
            checkpoint_dir=None, callback: Callable[[StepInfo], None] | None = None,
            evaluate: Callable[[nn.Module], dict] | None = None, data_dir=None) -> RecoverReport:
    """Train ``student`` (in place) towards ``teacher`` as ``config`` says, keeping its zeros.

    A student carrying activation thresholds trains with them applied and has them re-calibrated on
    its trained weights afterwards (``report.activation``; ``config.act_keep_thresholds`` keeps them).

    Args:
        student: the compressed causal LM, float32 (trained in place; LoRA is merged back).
        teacher: the dense model it was compressed from (put in eval mode and cast to the
            teacher dtype in place; it only runs under ``torch.inference_mode``); ``None`` for
            next-token loss alone.
        tokenizer: the student's tokenizer (reads the training text).
        config: objective, trainable set, optimizer, schedule, data, budget.
        checkpoint_dir: write checkpoints here every ``config.checkpoint_every`` steps and resume
            from the one found there.
        callback: progress, called after each optimizer step.
        evaluate: ``model -> dict`` of metrics, run before training, after it and (LoRA) on the
            unmasked adapters before the masked merge; results land in ``report.evaluation``.
        data_dir: the data directory (default ``$PRUNEKIT_DATA``).
    """
    t_start = time.perf_counter()
    check_models(student, teacher, tokenizer, config)
    text = training_text(config, tokenizer, data_dir)
    act_calib = calibration_for(student, tokenizer, data_dir)  # an unreadable text fails before training
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    masks = MaskSet.capture(student)
    before = sparsity_stats(student)
    fingerprint = {"zeros": before["zeros"], "params": sum(p.numel() for p in student.parameters())}
    t_dtype = _prepare_teacher(student, teacher, config)
    evaluation = {"before": evaluate(student)} if evaluate else {}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    linear_names = list(decoder_linears(student))
    named = _trainable(student, linear_names, config)
    projectable = {f"{n}.weight" for n in linear_names}
    objective = Objective(config, student, teacher)
    val_before = objective.evaluate(text.val, config.batch_size)
    trainer = Trainer(objective, text, config, named, masks, projectable, checkpoint_dir, callback, fingerprint)
    result = trainer.run()
    lora_info = None
    if config.trainable == "lora":
        lora_info, objective = _merge_lora(student, teacher, objective, text, masks, config, evaluate, evaluation)
    activation = recalibrate(student, act_calib, keep=config.act_keep_thresholds)
    val_after = objective.evaluate(text.val, config.batch_size)
    bad = _restore(student, flags, masks)
    after = sparsity_stats(student)
    if evaluate:
        evaluation["after"] = evaluate(student)
    return RecoverReport(
        config=config.to_dict(), data=text.describe(), trainable_params=sum(p.numel() for _, p in named),
        teacher_dtype=t_dtype, steps=result.steps, tokens=result.tokens, seconds=result.seconds,
        wall_seconds=time.perf_counter() - t_start, tokens_per_s=result.tokens_per_s, peak_rss_mb=peak_rss_mb(),
        optimizer_state_bytes=result.optimizer_state_bytes, mask_bytes=masks.bytes(), sparsity_before=before,
        sparsity_after=after, masks_kept=not bad, validation_before={"step": 0, **val_before},
        validation_after={"step": result.steps, **val_after}, resumed_from=result.resumed_from, lora=lora_info,
        activation=activation, evaluation=evaluation, validation=result.validation, history=result.history)
