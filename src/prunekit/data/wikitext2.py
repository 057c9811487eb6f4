"""WikiText-2 raw (Merity et al. 2016): the perplexity benchmark of the pruning literature.

The evaluation text is the HF rows of ``wikitext-2-raw-v1`` joined with ``"\\n\\n"``, as in the
SparseGPT/Wanda evaluation code. Locally it is rebuilt from ``wikitext-2-raw/wiki.test.raw``:
non-blank lines are HF rows with their newline, blank lines are empty rows.

Calibration on WikiText-2 (the train split: from the hub, or ``wiki.train.raw`` in the data
directory) follows the reference ``get_wikitext2``: the rows are single lines, far shorter than a
calibration window, so they are joined with ``" "`` in their order, tokenized once, and every
window starts at a seeded ``random.randint`` position of that stream.
"""

from __future__ import annotations

from ..registry import DATASETS
from .base import TextDataset, hub_texts


@DATASETS.register("wikitext2", help="WikiText-2 raw; test split for perplexity (literature protocol)")
class WikiText2(TextDataset):
    name = "wikitext2"
    calib_split = "train"
    eval_split = "test"
    packed = True
    shuffle_packed = False
    calib_joiner = " "

    def documents(self, split: str) -> list[str]:
        f = self.local("wikitext-2-raw", f"wiki.{split}.raw")
        if f is not None:
            lines = f.read_text(encoding="utf-8").split("\n")
            if lines and lines[-1] == "":
                lines.pop()  # the trailing newline of the file is not a row
            return [line + "\n" if line.strip() else "" for line in lines]
        try:
            return hub_texts(split, "wikitext", "wikitext-2-raw-v1")
        except FileNotFoundError:
            raise self.missing(split, f"wikitext-2-raw/wiki.{split}.raw") from None
