"""GSM8K (Cobbe et al. 2021) as calibration text: grade-school problems with worked answers.

The calibration-data study found arithmetic text calibrates as well as C4 or better. Each
problem is short, so windows are cut from the concatenated, seeded-shuffled problems.
"""

from __future__ import annotations

import json

from ..registry import DATASETS
from .base import TextDataset, hub_texts


@DATASETS.register("gsm8k", help="GSM8K problems + worked answers (train: calibration, test: eval text)")
class GSM8K(TextDataset):
    name = "gsm8k"
    calib_split = "train"
    eval_split = "test"
    packed = True

    def documents(self, split: str) -> list[str]:
        f = self.local("gsm8k", f"{split}.jsonl")
        if f is not None:
            rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
            return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
        try:
            qs = hub_texts(split, "gsm8k", "main", field="question")
            ans = hub_texts(split, "gsm8k", "main", field="answer")
        except FileNotFoundError:
            raise self.missing(split, f"gsm8k/{split}.jsonl") from None
        return [f"Question: {q}\nAnswer: {a}" for q, a in zip(qs, ans)]
