"""Training text for recovery: a dataset's training split packed into windows, with a held-out slice.

The text comes through the same loaders as calibration (:func:`prunekit.data.get_dataset`,
:func:`prunekit.data.tokenize`): a registered dataset's *training* split (``calib_split``) or a
local ``.txt`` / ``.jsonl`` file. The documents are joined the dataset's way, tokenized once and
cut into non-overlapping windows of ``seqlen`` tokens (packing, as LM training does); a seeded
random set of ``val_windows`` windows is held out for validation and never trained on.

Evaluation splits are never training text: a file whose name marks it as a test split
(``wiki.test.raw``, ``test.jsonl``) is refused.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data import DataNotFoundError, get_dataset, tokenize
from ..errors import ConfigError
from ..registry import DATASETS
from .config import RecoverConfig

log = logging.getLogger(__name__)

_TEST_NAME = re.compile(r"(^|[._\-])tests?([._\-]|$)", re.IGNORECASE)


@dataclass
class TrainingText:
    """Packed training and validation windows of one text."""

    name: str
    split: str
    train: Tensor  # [n_train, seqlen] token ids
    val: Tensor  # [n_val, seqlen]
    tokens_available: int  # tokens of the whole text (before windowing)

    def describe(self) -> dict:
        return {"name": self.name, "split": self.split, "tokens_available": self.tokens_available,
                "seqlen": int(self.train.shape[1]), "train_windows": int(self.train.shape[0]),
                "train_tokens": int(self.train.numel()), "val_windows": int(self.val.shape[0]),
                "val_tokens": int(self.val.numel())}


def check_not_eval_split(spec: str) -> None:
    """Refuse a file named as a test split: it is for measuring, never for training."""
    if spec in DATASETS:  # registered datasets train on their training split
        return
    if _TEST_NAME.search(Path(spec).name):
        raise ConfigError(f"--data {spec!r} looks like an evaluation (test) split; never train on it — use a "
                          "training or validation text (e.g. austen, gsm8k, wiki.valid.tokens)")


def load_documents(cfg: RecoverConfig, data_dir=None) -> tuple[list[str], str, str]:
    """``(documents, joiner, split)`` of the training text, with user mistakes as ConfigError."""
    check_not_eval_split(cfg.data)
    try:
        ds = get_dataset(cfg.data, data_dir, cfg.text_field)
        split = ds.calib_split
        docs = [d for d in ds.documents(split) if d.strip()]
    except KeyError as e:
        raise ConfigError(str(e.args[0]) if e.args else str(e)) from None
    except DataNotFoundError as e:
        raise ConfigError(str(e)) from None
    if not docs:
        raise ConfigError(f"--data {cfg.data!r} has no text; choose another dataset or file")
    return docs, ds.joiner, split


def pack_windows(ids: list[int] | Tensor, seqlen: int) -> Tensor:
    """Non-overlapping ``[n, seqlen]`` windows of a token stream (the remainder is dropped)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seqlen
    return ids[: n * seqlen].view(n, seqlen)


def split_validation(windows: Tensor, val_windows: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random choice of ``val_windows`` windows for validation; the rest (in order) train."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(windows.shape[0], generator=g)
    val_idx = perm[:val_windows].sort().values
    keep = torch.ones(windows.shape[0], dtype=torch.bool)
    keep[val_idx] = False
    return windows[keep], windows[val_idx]


def training_text(cfg: RecoverConfig, tokenizer, data_dir=None) -> TrainingText:
    """Tokenize ``cfg.data`` and split it into training and validation windows.

    Raises:
        ConfigError: unknown dataset, a test split, or too little text for one training window
            beyond the validation slice.
    """
    docs, joiner, split = load_documents(cfg, data_dir)
    ids = tokenize(tokenizer, joiner.join(docs))
    windows = pack_windows(ids, cfg.seqlen)
    need = cfg.val_windows + cfg.batch_size
    if windows.shape[0] < need:
        raise ConfigError(
            f"--data {cfg.data!r} is too short: {len(ids)} tokens make {windows.shape[0]} windows of seqlen="
            f"{cfg.seqlen}, but validation ({cfg.val_windows}) plus one batch ({cfg.batch_size}) needs {need}; "
            "use more text, a lower --seqlen or fewer --val-windows")
    train, val = split_validation(windows, cfg.val_windows, cfg.seed)
    text = TrainingText(cfg.data, split, train, val, len(ids))
    epochs = cfg.steps * cfg.tokens_per_step / max(train.numel(), 1)
    log.info("training text %s (%s split): %d tokens, %d training + %d validation windows of %d; budget %d "
             "tokens = %.2f epochs", cfg.data, split, len(ids), train.shape[0], val.shape[0], cfg.seqlen,
             cfg.steps * cfg.tokens_per_step, epochs)
    return text


def batch_indices(step: int, micro: int, cfg: RecoverConfig, n_train: int) -> Tensor:
    """Training-window indices of micro-batch ``micro`` of optimizer step ``step``.

    The order is a fresh seeded permutation every epoch, a pure function of ``(seed, step,
    micro)``: resuming at a step needs no saved data-loader state and sees exactly the windows an
    uninterrupted run would.
    """
    start = (step * cfg.grad_accum + micro) * cfg.batch_size
    out = []
    for k in range(start, start + cfg.batch_size):
        epoch, pos = divmod(k, n_train)
        perm = _epoch_permutation(cfg.seed, epoch, n_train)
        out.append(int(perm[pos]))
    return torch.tensor(out, dtype=torch.long)


_PERM_CACHE: dict[tuple[int, int, int], Tensor] = {}


def _epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    key = (seed, epoch, n)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
        _PERM_CACHE[key] = torch.randperm(n, generator=g)
    return _PERM_CACHE[key]
