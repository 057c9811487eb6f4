"""C4 (allenai/c4, English): the calibration source of Wanda/SparseGPT/OWL.

Calibration uses shard ``en/c4-train.00000-of-01024.json.gz``; evaluation (SparseGPT) uses the
first 1100 documents of ``en/c4-validation.00000-of-00008.json.gz`` joined with a space and
truncated to ``256 * seqlen`` tokens. Locally the shards are read from ``<data>/c4/``.
"""

from __future__ import annotations

import gzip
import json

from ..registry import DATASETS
from .base import TextDataset, hub_texts
from ..errors import ConfigError

SHARDS = {"train": "c4-train.00000-of-01024.json.gz", "validation": "c4-validation.00000-of-00008.json.gz"}


@DATASETS.register("c4", help="C4 en shard 0 (calibration: train; eval: validation, 1100 docs)")
class C4(TextDataset):
    name = "c4"
    calib_split = "train"
    eval_split = "validation"
    joiner = " "

    def documents(self, split: str) -> list[str]:
        shard = SHARDS.get(split)
        if shard is None:
            raise ConfigError(f"c4 split {split!r} is not one of: {', '.join(SHARDS)}")
        f = self.local("c4", shard)
        if f is not None:
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                docs = [json.loads(line)["text"] for line in fh]
        else:
            try:
                docs = hub_texts("train", "allenai/c4", data_files={"train": f"en/{shard}"})
            except FileNotFoundError:
                raise self.missing(split, f"c4/{shard}") from None
        return docs[:1100] if split == "validation" else docs

    def eval_token_limit(self, seqlen: int) -> int | None:
        return 256 * seqlen
