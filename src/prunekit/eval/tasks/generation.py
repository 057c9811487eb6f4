"""Generation scored by exact match: factoid QA (BIG-bench ``qa_wikidata``, your own JSONL).

LLM-KICK (Jaiswal et al. 2024) shows factoid recall is the first ability pruning destroys.
Each prompt is completed greedily (KV cache, batched, left padding) until a newline or
``max_new_tokens``; the completion is compared with every gold answer after SQuAD
normalization (:func:`.scoring.normalize_answer`):

* ``exact_match``: the normalized completion equals a normalized answer;
* ``contains``: a normalized answer occurs in the completion as whole words (lenient; small
  models often keep talking after the answer).

BIG-bench generative tasks use the task's own prefixes: ``qa_wikidata`` has input prefix
``"\\n"`` and output prefix ``" "``, so a 3-shot prompt reads ``"A is a\\nB is b\\nC is c\\nQ is"``
and the model writes ``" answer"``. Exemplars are the first k examples of a seeded shuffle
(seed 1234), never scored; the rest are scored in that order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...registry import TASKS
from .base import Task, TaskSettings, take
from .lm import Counter, greedy_generate
from .loaders import as_answers, existing_file, read_jsonl, shuffled
from .scoring import contains_match, exact_match, mean_stderr


@dataclass(frozen=True)
class GenExample:
    prompt: str
    answers: tuple[str, ...]


class GenerationTask(Task):
    family = "generation"
    main_metric = "exact_match"

    def __init__(self, name: str, loader: Callable[[], list[GenExample]], info: dict[str, Any],
                 max_new_tokens: int = 16, stop: tuple[str, ...] = ("\n",)) -> None:
        super().__init__(name)
        self._loader, self.info = loader, info
        self.max_new_tokens, self.stop = int(max_new_tokens), tuple(stop)
        self._examples: list[GenExample] | None = None

    def examples(self) -> list[GenExample]:
        if self._examples is None:
            self._examples = self._loader()
        return self._examples

    def describe(self) -> dict[str, Any]:
        return {**self.info, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop), "decoding": "greedy",
                "examples_available": len(self.examples())}

    def run(self, model, tokenizer, settings: TaskSettings, limit=None, progress=None):
        t0 = time.perf_counter()
        exs = take(self.examples(), limit)
        counter = Counter()
        outs = greedy_generate(model, tokenizer, [e.prompt for e in exs], self.max_new_tokens, self.stop,
                               settings.batch_size, settings.max_length, counter, progress)
        em = [exact_match(o, e.answers) for o, e in zip(outs, exs)]
        cm = [contains_match(o, e.answers) for o, e in zip(outs, exs)]
        (m_em, s_em), (m_cm, s_cm) = mean_stderr(em), mean_stderr(cm)
        samples = [{"prompt_tail": e.prompt[-120:], "generation": o, "answers": list(e.answers), "exact_match": s}
                   for e, o, s in zip(exs, outs, em)]
        return self._result({"exact_match": m_em, "contains": m_cm}, {"exact_match": s_em, "contains": s_cm},
                             len(exs), counter, t0, samples)


def bigbench_generation_examples(task: dict[str, Any], shots: int) -> list[GenExample]:
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ").rstrip()  # the model writes the space
    exs = shuffled(task["examples"])
    where = task.get("name", "task.json")

    def first(ex) -> str:
        return as_answers(ex["target"], where)[0]

    head = task.get("task_prefix", "") + "".join(f"{in_prefix}{ex['input']}{out_prefix} {first(ex)}" for ex in exs[:shots])
    return [GenExample((head + f"{in_prefix}{ex['input']}{out_prefix}").lstrip(), as_answers(ex["target"], where))
            for ex in exs[shots:]]


def bigbench_generation_task(name: str, path: Path, task: dict[str, Any], shots: int = 3,
                             max_new_tokens: int = 16) -> Task:
    return GenerationTask(name, lambda: bigbench_generation_examples(task, shots),
                          {"source": str(path), "shots": shots, "format": "BIG-bench json prefixes",
                           "order": "seeded shuffle (1234); exemplars are the first k"}, max_new_tokens)


@TASKS.register("qa_wikidata", help="BIG-bench qa_wikidata (20,442 factoid completions), 3-shot, exact match")
def qa_wikidata(data_dir=None, shots: int = 3, max_new_tokens: int = 16) -> Task:
    from .loaders import load_bigbench

    path, task = load_bigbench("qa_wikidata", data_dir)
    return bigbench_generation_task("qa_wikidata", path, task, int(shots), int(max_new_tokens))


def _generic_qa(path: Path, shots: int) -> list[GenExample]:
    rows = read_jsonl(path, [["prompt", "question"], ["answers", "answer"]])
    items = []
    for i, r in enumerate(rows, 1):
        answers = as_answers(r.get("answers", r.get("answer")), f"{path}: example {i}")
        prompt = str(r["prompt"]) if "prompt" in r else f"Question: {r['question']}\nAnswer:"
        items.append((prompt.rstrip(), answers))
    head = "".join(f"{p} {a[0]}\n\n" for p, a in items[:shots])
    return [GenExample(head + p, a) for p, a in items[shots:]]


def jsonl_qa_task(spec: str, shots: int = 0, max_new_tokens: int = 16) -> Task:
    """``qa:FILE.jsonl``: rows ``{"prompt" | "question", "answers": [...] | "answer"}``; the first
    ``shots`` rows become exemplars."""
    path = existing_file(spec, "QA JSONL")
    return GenerationTask(path.stem, lambda: _generic_qa(path, int(shots)),
                          {"source": str(path), "shots": int(shots), "format": "jsonl qa"}, int(max_new_tokens))
