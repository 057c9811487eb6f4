"""``prunekit recover``'s flags are generated from RecoverConfig's fields: every flag, type, choice and help
text of the hand-written flag set they replaced still parses to the same RecoverConfig (issue 26)."""

from __future__ import annotations

import dataclasses

import pytest

from prunekit.cli import build_parser
from prunekit.cli.recover import add_field_args, build_recover_config, chain_config, field_values
from prunekit.errors import ConfigError
from prunekit.recover import RecoverConfig

# The recovery group of `prunekit recover --help` on main before the flags were generated:
# (flag, type, choices, help); the destination is the flag's name with '_' for '-'.
MAIN_FLAGS = [
    ('--data', 'str', None,
     'training text: registered dataset (its training split) or .txt/.jsonl file (default austen); never an evaluation split'),
    ('--text-field', 'str', None, 'JSONL field holding the text (default text)'),
    ('--tokens', 'int', None, 'training budget in tokens (default 262144)'),
    ('--seqlen', 'int', None, 'tokens per training window (default 1024)'),
    ('--batch-size', 'int', None, 'windows per forward/backward (default 1)'),
    ('--grad-accum', 'int', None, 'micro-batches per optimizer step (default 8)'),
    ('--val-windows', 'int', None, 'held-out windows for validation (default 8)'),
    ('--val-every', 'int', None, 'validate every N steps (default: before/after only)'),
    ('--kl-weight', 'float', None, 'weight of T^2*KL distillation (default 1)'),
    ('--ce-weight', 'float', None, 'weight of next-token cross-entropy (default 0)'),
    ('--hidden-weight', 'float', None, 'weight of hidden-state MSE (default 0)'),
    ('--temperature', 'float', None, 'distillation temperature T (default 1)'),
    ('--hidden-layers', 'int+', None, 'hidden states to match (default -1)'),
    ('--loss-chunk', 'int', None, 'positions per logits chunk (default 256)'),
    ('--trainable', 'str', ('full', 'lora'), 'full (masked) or lora (default full)'),
    ('--train-embeddings', 'store_true', None, 'also train embeddings / LM head'),
    ('--lora-rank', 'int', None, 'LoRA rank (default 16)'),
    ('--lora-alpha', 'float', None, 'LoRA alpha (default 32)'),
    ('--lora-dropout', 'float', None, 'LoRA dropout (default 0)'),
    ('--optimizer', 'str', ('adamw', 'galore', 'spam'), 'adamw, galore or spam (default adamw)'),
    ('--lr', 'float', None, 'peak learning rate (default 1e-4)'),
    ('--weight-decay', 'float', None, 'decoupled weight decay on matrices (default 0)'),
    ('--max-grad-norm', 'float', None, 'gradient-norm clip (default 1)'),
    ('--warmup-ratio', 'float', None, 'fraction of steps of linear warm-up (default 0.05)'),
    ('--schedule', 'str', ('cosine', 'linear', 'constant'), 'decay after warm-up (default cosine)'),
    ('--min-lr-ratio', 'float', None, 'final lr / peak lr (default 0.1)'),
    ('--galore-rank', 'int', None, 'GaLore projection rank (default 128)'),
    ('--galore-update-gap', 'int', None, 'steps between GaLore SVDs (default 200)'),
    ('--galore-scale', 'float', None, 'GaLore update scale alpha (default 1)'),
    ('--spam-threshold', 'float', None, 'SPAM spike threshold theta (default 5000)'),
    ('--spam-reset-interval', 'int', None, 'SPAM momentum reset interval (default 500)'),
    ('--spam-warmup', 'int', None, 'SPAM warm-up steps after a reset (default 150)'),
    ('--spam-clip-delay', 'int', None, 'steps after a reset before clipping (default 20)'),
    ('--bf16', 'store_true', None, "bfloat16 autocast for the student's compute"),
    ('--teacher-dtype', 'str', ('auto', 'float32', 'bfloat16'),
     'teacher weights dtype (default auto: bfloat16 where the CPU has bf16 units)'),
    ('--seed', 'int', None, 'seed of data order and LoRA init (default 0)'),
    ('--act-keep-thresholds', 'store_true', None, "keep a model's activation thresholds as trained with (default: "
     're-calibrate them on the trained weights, the sparsity they claim)'),
    ('--checkpoint-every', 'int', None, 'write a resumable checkpoint beside --out every N steps (default: never)'),
    ('--restart', 'store_true', None, 'discard an existing checkpoint instead of resuming it'),
]


def _recover_parser():
    sub = next(a for a in build_parser()._actions if isinstance(a.choices, dict) and "recover" in a.choices)
    return sub.choices["recover"]


def _kind(action) -> str:
    if action.nargs == 0:
        return "store_true"
    return (action.type.__name__ if action.type else "str") + ("+" if action.nargs == "+" else "")


def test_generated_flags_are_mains_flags():
    group = next(g for g in _recover_parser()._action_groups if g.title == "recovery (docs/recover.md)")
    got = [(a.option_strings[0], _kind(a), tuple(a.choices) if a.choices else None, a.help)
           for a in group._group_actions]
    assert got == MAIN_FLAGS
    for a in group._group_actions:
        assert a.dest == a.option_strings[0][2:].replace("-", "_") and a.default in (None, False)


def _config(*argv: str) -> RecoverConfig:
    return build_recover_config(_recover_parser().parse_args(["student", "--out", "o", *argv]))


def test_no_flags_is_the_default_config():
    assert _config() == RecoverConfig()


def test_every_flag_reaches_its_field():
    argv = ["--data", "gsm8k", "--text-field", "body", "--tokens", "4096", "--seqlen", "64", "--batch-size", "2",
            "--grad-accum", "3", "--val-windows", "4", "--val-every", "5", "--kl-weight", "0.5", "--ce-weight", "0.25",
            "--hidden-weight", "0.125", "--temperature", "2", "--hidden-layers", "-1", "-3", "--loss-chunk", "32",
            "--train-embeddings", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
            "--optimizer", "galore", "--lr", "3e-4", "--weight-decay", "0.01", "--max-grad-norm", "0.5",
            "--warmup-ratio", "0.1", "--schedule", "linear", "--min-lr-ratio", "0.2", "--galore-rank", "64",
            "--galore-update-gap", "50", "--galore-scale", "0.25", "--spam-threshold", "100",
            "--spam-reset-interval", "40", "--spam-warmup", "10", "--spam-clip-delay", "3", "--bf16",
            "--teacher-dtype", "float32", "--seed", "7", "--checkpoint-every", "9"]
    assert _config(*argv) == RecoverConfig(
        data="gsm8k", text_field="body", tokens=4096, seqlen=64, batch_size=2, grad_accum=3, val_windows=4,
        val_every=5, kl_weight=0.5, ce_weight=0.25, hidden_weight=0.125, temperature=2.0, hidden_layers=(-1, -3),
        loss_chunk=32, train_embeddings=True, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, optimizer="galore",
        lr=3e-4, weight_decay=0.01, max_grad_norm=0.5, warmup_ratio=0.1, schedule="linear", min_lr_ratio=0.2,
        galore_rank=64, galore_update_gap=50, galore_scale=0.25, spam_threshold=100.0, spam_reset_interval=40,
        spam_warmup=10, spam_clip_delay=3, bf16=True, teacher_dtype="float32", seed=7, checkpoint_every=9)


def test_representative_command_lines():
    lora = _config("--trainable", "lora", "--lora-rank", "8", "--optimizer", "spam", "--kl-weight", "0",
                   "--ce-weight", "1", "--restart")
    assert lora == RecoverConfig(trainable="lora", lora_rank=8, optimizer="spam", kl_weight=0.0, ce_weight=1.0)
    assert isinstance(lora.kl_weight, float) and isinstance(lora.lora_rank, int)
    assert _config("--hidden-layers", "2", "--hidden-weight", "1").hidden_layers == (2,)
    assert _config("--tokens", "1000", "--seqlen", "100") == RecoverConfig(tokens=1000, seqlen=100)


def test_bad_values_fail_in_the_config_and_bad_choices_in_argparse(capsys):
    with pytest.raises(ConfigError, match="tokens=0"):
        _config("--tokens", "0")
    with pytest.raises(ConfigError, match="train_embeddings=True needs trainable='full'"):
        _config("--trainable", "lora", "--train-embeddings")
    with pytest.raises(SystemExit):
        _config("--optimizer", "sgd")
    assert "invalid choice: 'sgd'" in capsys.readouterr().err


def test_recover_option_wraps_a_lone_value_of_a_list_setting(tmp_path):
    txt = tmp_path / "train.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    parser = build_parser()
    args = parser.parse_args(["prune", "m", "--recover", "--recover-option", "hidden_layers=-2",
                              "--recover-option", "hidden_weight=1", "--recover-option", f"data={txt}"])
    assert chain_config(args).hidden_layers == (-2,)
    args = parser.parse_args(["prune", "m", "--recover", "--recover-option", "lr_max=1"])
    with pytest.raises(ConfigError, match="'lr_max' is not a recovery setting"):
        chain_config(args)


def test_field_args_of_any_dataclass():
    """The generator knows no RecoverConfig field: flag names, types, lists and switches come from metadata
    and defaults alone."""
    import argparse

    @dataclasses.dataclass(frozen=True)
    class Options:
        width: int = dataclasses.field(default=4, metadata={"cli": {"help": "w", "flag": "--w"}})
        scale: float = dataclasses.field(default=1.0, metadata={"cli": {"help": "s"}})
        mode: str = dataclasses.field(default="a", metadata={"cli": {"help": "m", "choices": ("a", "b")}})
        keep: tuple[int, ...] = dataclasses.field(default=(0,), metadata={"cli": {"help": "k"}})
        fast: bool = dataclasses.field(default=False, metadata={"cli": {"help": "f"}})
        hidden: int = 3

    p = argparse.ArgumentParser()
    add_field_args(p, Options)
    assert "--hidden" not in p.format_help()
    args = p.parse_args(["--w", "8", "--scale", "2", "--keep", "1", "2", "--fast"])
    assert Options(**field_values(Options, args)) == Options(width=8, scale=2.0, keep=(1, 2), fast=True)
    assert field_values(Options, p.parse_args([])) == {}
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
