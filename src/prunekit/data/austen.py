"""Six Jane Austen novels (Project Gutenberg): general English prose for offline calibration.

Each novel is one long document, so calibration windows follow the literature's protocol
(a random window inside one random document). There is no held-out split: evaluating on it
measures fit to the calibration source, not generalisation.
"""

from __future__ import annotations

from ..registry import DATASETS
from .base import TextDataset


@DATASETS.register("austen", help="six Jane Austen novels, one document each (offline calibration)")
class Austen(TextDataset):
    name = "austen"
    calib_split = "train"
    eval_split = "train"

    def documents(self, split: str) -> list[str]:
        d = self.local("austen")
        files = sorted(d.glob("*.txt")) if d is not None else []
        if not files:
            raise self.missing(split, "austen/*.txt")
        return [f.read_text(encoding="utf-8") for f in files]
