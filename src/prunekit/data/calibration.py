"""Calibration sampling by the literature's protocol (SparseGPT/Wanda ``get_c4``).

For each of ``nsamples`` samples: draw a random document, redraw until it is longer than
``seqlen`` tokens, then take a uniformly random window of ``seqlen`` tokens inside it. Python's
``random`` seeded with ``seed`` drives the draws exactly as the reference code does, so the same
documents give the same token ids. Datasets of short documents (``packed``) draw the windows from
the concatenated text instead.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from ..options import check_int as _check_int
from .base import TextDataset, get_dataset

log = logging.getLogger(__name__)


class CalibrationError(ConfigError):
    """Not enough calibration text for the requested windows."""


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: ``nsamples`` windows of ``seqlen`` tokens drawn from ``dataset``.

    ``dataset`` is a registered name (``austen``, ``gsm8k``, ``c4``, ``wikitext2`` …) or a path to
    a ``.txt`` / ``.jsonl`` file (``text_field`` picks the JSONL field).
    """

    dataset: str = "austen"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    text_field: str = "text"
    #: cut windows from the concatenated documents (None: the dataset's default)
    packing: bool | None = None

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ConfigError("calibration dataset is empty: pass a dataset name (see `prunekit ls`) or a file path")
        _check_int("nsamples", self.nsamples, 1)
        _check_int("seqlen", self.seqlen, 2)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("seed", self.seed, 0)


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` the way the reference code calls the tokenizer (special tokens on)."""
    return tokenizer(text, verbose=False)["input_ids"]


def sample_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """``[nsamples, seqlen]`` token ids: random windows inside random long-enough documents."""
    longest = max(len(d) for d in docs)
    if longest <= seqlen:  # a token covers at least one character: no document can be long enough
        raise CalibrationError(
            f"too little calibration text per document: the longest of {len(docs)} documents has {longest} "
            f"characters, fewer than seqlen={seqlen} tokens; pack short documents with --packing, or lower --seqlen")
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    too_short: set[int] = set()
    out = []
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if i not in cache:
                cache[i] = tokenize(tokenizer, docs[i])
            ids = cache[i]
            if len(ids) > seqlen:
                break
            too_short.add(i)
            if len(too_short) == len(docs):
                longest = max(len(v) for v in cache.values())
                raise CalibrationError(
                    f"too little calibration text: no document is longer than seqlen={seqlen} tokens "
                    f"(longest has {longest}); lower --seqlen, use a dataset with longer documents, "
                    "or pack short documents with --packing"
                )
        j = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[j : j + seqlen])
    return torch.tensor(out, dtype=torch.long)


def sample_packed(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, joiner: str = "\n\n",
                  shuffle: bool = True) -> Tensor:
    """Windows drawn from the concatenated documents (for short documents), seeded-shuffled first
    unless ``shuffle`` is off (then the draw is the reference ``get_wikitext2``'s)."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    if shuffle:
        rng.shuffle(order)
    ids = tokenize(tokenizer, joiner.join(docs[i] for i in order))
    if len(ids) <= seqlen:
        raise CalibrationError(
            f"too little calibration text: {len(ids)} tokens in all, need more than seqlen={seqlen}; "
            "lower --seqlen or add text"
        )
    out = []
    for _ in range(nsamples):
        j = rng.randint(0, len(ids) - seqlen - 1)
        out.append(ids[j : j + seqlen])
    return torch.tensor(out, dtype=torch.long)


def calibration_ids(cfg: CalibConfig, tokenizer, data_dir=None) -> Tensor:
    """Token ids ``[nsamples, seqlen]`` for ``cfg`` (dataset name or file path)."""
    ds: TextDataset = get_dataset(cfg.dataset, data_dir, cfg.text_field)
    rows = ds.documents(ds.calib_split)
    docs = [d for d in rows if d.strip()]
    if not docs:
        raise CalibrationError(f"calibration dataset {cfg.dataset!r} has no text")
    packed = ds.packed if cfg.packing is None else cfg.packing
    log.info("calibration: %d x %d tokens from %s (%s, seed %d)", cfg.nsamples, cfg.seqlen, cfg.dataset,
             "packed" if packed else "one window per document", cfg.seed)
    if packed and not ds.shuffle_packed:  # every row in order, empty ones too: the reference's joined text
        return sample_packed(rows, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, ds.calib_joiner, shuffle=False)
    if packed:
        return sample_packed(docs, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, ds.calib_joiner)
    return sample_windows(docs, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
