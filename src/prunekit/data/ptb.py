"""Penn Treebank (ptb_text_only): test sentences joined with a space (SparseGPT protocol)."""

from __future__ import annotations

from ..registry import DATASETS
from .base import TextDataset, hub_texts


@DATASETS.register("ptb", help="Penn Treebank test sentences joined with a space (hub or <data>/ptb)")
class PTB(TextDataset):
    name = "ptb"
    joiner = " "

    def documents(self, split: str) -> list[str]:
        f = self.local("ptb", f"ptb.{split}.txt")
        if f is not None:
            return [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        try:
            return hub_texts(split, "ptb_text_only", "penn_treebank", field="sentence")
        except FileNotFoundError:
            raise self.missing(split, f"ptb/ptb.{split}.txt") from None
