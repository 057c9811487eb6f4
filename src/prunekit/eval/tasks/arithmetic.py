"""Arithmetic reasoning by generation: GSM8K (Cobbe et al. 2021) k-shot chain of thought.

The harness's ``gsm8k`` protocol: k exemplars from the train split written as
``"Question: {q}\\nAnswer: {worked answer ending in #### N}\\n\\n"``, then
``"Question: {q}\\nAnswer:"``; greedy decoding (KV cache, batched) for up to 256 tokens, cut at
``"Question:"``, ``"\\n\\n"`` (the exemplar separator) or an end-of-turn token. Scores:

* ``exact_match``: the number after ``####`` in the generation equals the gold number
  (the harness's ``strict-match``);
* ``exact_match_flexible``: the last number in the generation equals it (``flexible-extract``).

Numbers are compared after removing ``,`` / ``$`` / a trailing ``.`` (``18.00`` equals ``18``).
Exemplars are a seeded sample (seed 1234) of the train split, the same for every run.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from ...registry import TASKS
from .base import Task, TaskSettings, take
from .lm import Counter, greedy_generate
from .loaders import SEED, data_file, existing_file, read_jsonl
from .scoring import extract_flexible, extract_strict, gsm8k_gold, mean_stderr
from ...errors import ConfigError

STOP = ("Question:", "\n\n", "</s>", "<|im_end|>", "<|endoftext|>")


class ArithmeticTask(Task):
    family = "arithmetic"
    main_metric = "exact_match"

    def __init__(self, name: str, test: Path, train: Path | None, shots: int, info: dict[str, Any],
                 max_new_tokens: int = 256) -> None:
        super().__init__(name)
        self.test, self.train, self.shots, self.info = test, train, int(shots), info
        self.max_new_tokens = int(max_new_tokens)
        self._examples: list[tuple[str, str]] | None = None

    def examples(self) -> list[tuple[str, str]]:
        """``(prompt, gold number)`` pairs."""
        if self._examples is None:
            rows = read_jsonl(self.test, [["question"], ["answer"]])
            gold = []
            for i, r in enumerate(rows, 1):
                try:
                    gold.append(gsm8k_gold(str(r["answer"])))
                except ValueError as e:
                    raise ConfigError(f"{self.test}: example {i}: {e}") from None
            if self.train is not None:
                pool = read_jsonl(self.train, [["question"], ["answer"]])
                shots = random.Random(SEED).sample(pool, self.shots) if self.shots else []
            else:  # exemplars are the first k rows of the file itself
                shots, rows, gold = rows[: self.shots], rows[self.shots :], gold[self.shots :]
            head = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
            self._examples = [(f"{head}Question: {r['question']}\nAnswer:", g) for r, g in zip(rows, gold)]
        return self._examples

    def describe(self) -> dict[str, Any]:
        return {**self.info, "shots": self.shots, "max_new_tokens": self.max_new_tokens, "stop": list(STOP),
                "decoding": "greedy", "examples_available": len(self.examples())}

    def run(self, model, tokenizer, settings: TaskSettings, limit=None, progress=None):
        t0 = time.perf_counter()
        exs = take(self.examples(), limit)
        counter = Counter()
        outs = greedy_generate(model, tokenizer, [p for p, _ in exs], self.max_new_tokens, STOP,
                               settings.batch_size, settings.max_length, counter, progress)
        strict = [1.0 if extract_strict(o) == g else 0.0 for o, (_, g) in zip(outs, exs)]
        flex = [1.0 if extract_flexible(o) == g else 0.0 for o, (_, g) in zip(outs, exs)]
        (m_s, s_s), (m_f, s_f) = mean_stderr(strict), mean_stderr(flex)
        samples = [{"generation": o, "gold": g, "strict": extract_strict(o), "flexible": extract_flexible(o)}
                   for o, (_, g) in zip(outs, exs)]
        return self._result({"exact_match": m_s, "exact_match_flexible": m_f},
                            {"exact_match": s_s, "exact_match_flexible": s_f}, len(exs), counter, t0, samples)


@TASKS.register("gsm8k", help="GSM8K test (1,319 problems), 5-shot chain of thought from train, greedy, exact match")
def gsm8k(data_dir=None, shots: int = 5, max_new_tokens: int = 256) -> Task:
    test = data_file(data_dir, "gsm8k", "test.jsonl", task="gsm8k")
    train = data_file(data_dir, "gsm8k", "train.jsonl", task="gsm8k") if int(shots) else None
    return ArithmeticTask("gsm8k", test, train, int(shots), {"split": "test", "fewshot_source": "train (seeded sample)",
                                                             "format": "harness gsm8k"}, int(max_new_tokens))


def jsonl_arith_task(spec: str, shots: int = 0, max_new_tokens: int = 256) -> Task:
    """``arith:FILE.jsonl``: GSM8K-format rows ``{"question", "answer": "... #### N" | N}``; the first
    ``shots`` rows become exemplars."""
    path = existing_file(spec, "arithmetic JSONL")
    return ArithmeticTask(path.stem, path, None, int(shots), {"source": str(path), "format": "jsonl gsm8k"},
                          int(max_new_tokens))
