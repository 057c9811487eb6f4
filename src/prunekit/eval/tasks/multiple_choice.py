"""Multiple choice by log-likelihood: BoolQ, PIQA, RTE, MMLU, BIG-bench, your own JSONL.

Each example is a context and a list of continuations; the model's total log-likelihood of
each continuation given the context decides (``acc``), or the same per character of the
continuation (``acc_norm``) — lm-evaluation-harness's definitions (see :mod:`.scoring`).
Prompt formats are the harness's:

* BoolQ (Clark et al. 2019): ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` → ``" no"``/``" yes"``.
* PIQA (Bisk et al. 2020): ``"Question: {goal}\\nAnswer:"`` → ``" {sol1}"``/``" {sol2}"``.
* RTE (GLUE): ``"{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:"`` → ``" True"``/``" False"``.
* MMLU (Hendrycks et al. 2021): ``"The following are multiple choice questions (with answers) about
  {subject}.\\n\\n"``, then k dev-split shots ``"{q}\\nA. …\\nD. …\\nAnswer: X\\n\\n"``, then the
  question → ``" A"``…``" D"``. Test split; ``--limit`` takes questions round-robin over subjects.
* BIG-bench ``target_scores`` tasks: ``"Q: {input}"`` + ``"\\n  choice: {c}"`` per choice when the task
  says ``append_choices_to_input`` + ``"\\nA:"`` → ``" {choice}"`` (the task's own prefixes win).
"""

from __future__ import annotations

import csv
import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...registry import TASKS
from .base import Task, TaskSettings, take
from .lm import Counter, loglikelihoods
from .loaders import data_file, existing_file, load_bigbench, read_jsonl, shuffled
from .scoring import mc_metrics, mc_predictions
from ...errors import ConfigError


@dataclass(frozen=True)
class MCExample:
    context: str
    choices: tuple[str, ...]
    gold: tuple[int, ...]  # acceptable choice indices (usually one)


class MultipleChoiceTask(Task):
    family = "multiple_choice"
    main_metric = "acc"

    def __init__(self, name: str, loader: Callable[[], list[MCExample]], info: dict[str, Any]) -> None:
        super().__init__(name)
        self._loader, self.info = loader, info
        self._examples: list[MCExample] | None = None

    def examples(self) -> list[MCExample]:
        if self._examples is None:
            self._examples = self._loader()
            for i, ex in enumerate(self._examples):
                if len(ex.choices) < 2 or not ex.gold or any(not 0 <= g < len(ex.choices) for g in ex.gold):
                    raise ConfigError(f"task {self.name!r}: example {i} has {len(ex.choices)} choices and gold "
                                     f"{list(ex.gold)}; it needs >= 2 choices and a gold index among them")
        return self._examples

    def describe(self) -> dict[str, Any]:
        return {**self.info, "examples_available": len(self.examples())}

    def run(self, model, tokenizer, settings: TaskSettings, limit=None, progress=None):
        t0 = time.perf_counter()
        exs = take(self.examples(), limit)
        counter = Counter()
        lls = loglikelihoods(model, tokenizer, [(e.context, e.choices) for e in exs], settings.batch_size,
                             settings.max_length, counter, progress)
        metrics, stderr = mc_metrics(lls, [e.choices for e in exs], [e.gold for e in exs])
        preds = collections.Counter(mc_predictions(ll, e.choices)[0] for e, ll in zip(exs, lls))
        samples = []
        for e, ll in list(zip(exs, lls))[:5]:
            pred, pred_norm = mc_predictions(ll, e.choices)
            samples.append({"context_tail": e.context[-200:], "choices": list(e.choices), "gold": list(e.gold),
                            "loglikelihoods": [round(x, 4) for x in ll], "pred": pred, "pred_norm": pred_norm})
        return self._result(metrics, stderr, len(exs), counter, t0, samples, chance=_chance(exs),
                            majority=_majority(exs),
                            pred_position_share={str(k): v / len(exs) for k, v in sorted(preds.items())})


def _majority(exs: list[MCExample]) -> float:
    """Accuracy of always answering the choice position most often gold in this subset (for yes/no
    tasks: the majority class). A model biased to one answer lands here, or at 1 - it."""
    pos = collections.Counter(g for e in exs for g in e.gold)
    best = pos.most_common(1)[0][0]
    return sum(best in e.gold for e in exs) / len(exs)


def _chance(exs: list[MCExample]) -> float:
    """Expected accuracy of a uniform random guess (the floor to read the numbers against)."""
    return sum(len(e.gold) / len(e.choices) for e in exs) / len(exs)


# --- the data directory's benchmarks --------------------------------------------------------
def _boolq(data_dir) -> list[MCExample]:
    rows = read_jsonl(data_file(data_dir, "boolq", "dev.jsonl", task="boolq"), [["passage"], ["question"], ["answer"]])
    return [MCExample(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", (" no", " yes"), (int(bool(r["answer"])),))
            for r in rows]


def _piqa(data_dir) -> list[MCExample]:
    rows = read_jsonl(data_file(data_dir, "piqa", "valid.jsonl", task="piqa"), [["goal"], ["sol1"], ["sol2"]])
    labels = data_file(data_dir, "piqa", "valid-labels.lst", task="piqa").read_text().split()
    if len(labels) != len(rows):
        raise ConfigError(f"piqa: {len(rows)} questions but {len(labels)} labels; the files do not belong together")
    return [MCExample(f"Question: {r['goal']}\nAnswer:", (f" {r['sol1']}", f" {r['sol2']}"), (int(y),))
            for r, y in zip(rows, labels)]


def _rte(data_dir) -> list[MCExample]:
    path = data_file(data_dir, "rte", "dev.tsv", task="rte")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not {"sentence1", "sentence2", "label"} <= set(rows[0]):
        raise ConfigError(f"{path}: expected the columns sentence1, sentence2, label (HF glue/rte export)")
    # label 0 = entailment → " True" is gold
    return [MCExample(f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", (" True", " False"),
                      (int(r["label"]),)) for r in rows]


_LETTERS = ("A", "B", "C", "D")


def _mmlu_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    for i, r in enumerate(rows, 1):
        if len(r) != 6 or r[5].strip() not in _LETTERS:
            raise ConfigError(f"{path}: row {i} is not question,A,B,C,D,answer(A-D)")
    return rows


def _mmlu_question(r: list[str]) -> str:
    return r[0].strip() + "".join(f"\n{letter}. {choice}" for letter, choice in zip(_LETTERS, r[1:5])) + "\nAnswer:"


def _mmlu(data_dir, shots: int = 5, split: str = "test", subjects: str | None = None) -> list[MCExample]:
    root = data_file(data_dir, "mmlu", split, task="mmlu")
    files = sorted(root.glob(f"*_{split}.csv"))
    wanted = None if subjects is None else {s.strip() for s in str(subjects).split("+") if s.strip()}
    if wanted:
        known = {f.name[: -len(f"_{split}.csv")] for f in files}
        if wanted - known:
            raise ConfigError(f"mmlu: unknown subject(s) {sorted(wanted - known)}; choose from {sorted(known)}")
        files = [f for f in files if f.name[: -len(f"_{split}.csv")] in wanted]
    per_subject = []
    for f in files:
        subject = f.name[: -len(f"_{split}.csv")]
        dev = _mmlu_rows(data_file(data_dir, "mmlu", "dev", f"{subject}_dev.csv", task="mmlu"))[:shots]
        if len(dev) < shots:
            raise ConfigError(f"mmlu {subject}: only {len(dev)} dev questions for {shots} shots")
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        head += "".join(f"{_mmlu_question(r)} {r[5].strip()}\n\n" for r in dev)
        per_subject.append([MCExample(head + _mmlu_question(r), tuple(f" {x}" for x in _LETTERS),
                                      (_LETTERS.index(r[5].strip()),)) for r in _mmlu_rows(f)])
    # round-robin over subjects so that a --limit subset spans all of them
    out, k = [], 0
    while any(k < len(s) for s in per_subject):
        out.extend(s[k] for s in per_subject if k < len(s))
        k += 1
    return out


def bigbench_mc(task: dict[str, Any], shots: int = 0) -> list[MCExample]:
    """BIG-bench ``target_scores`` examples (seeded order; the first ``shots`` become exemplars)."""
    in_prefix = task.get("example_input_prefix", "\nQ: ").lstrip("\n") or ""
    out_prefix = task.get("example_output_prefix", "\nA: ").rstrip()  # the space goes to the choice
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append = bool(task.get("append_choices_to_input", True))
    prefix = task.get("task_prefix", "")
    exs = shuffled(task["examples"])

    def fmt(ex) -> str:
        choices = "".join(f"{choice_prefix}{c}" for c in ex["target_scores"]) if append else ""
        return f"{in_prefix}{ex['input']}{choices}{out_prefix}"

    def gold(ex) -> tuple[int, ...]:
        scores = list(ex["target_scores"].values())
        return tuple(i for i, s in enumerate(scores) if s == max(scores) and s > 0)

    head = prefix + "".join(fmt(ex) + " " + max(ex["target_scores"], key=ex["target_scores"].get) + "\n\n"
                            for ex in exs[:shots])
    return [MCExample(head + fmt(ex), tuple(f" {c}" for c in ex["target_scores"]), gold(ex)) for ex in exs[shots:]]


def _generic_mc(path: Path) -> list[MCExample]:
    out = []
    for i, r in enumerate(read_jsonl(path, [["context"], ["choices"], ["label", "gold"]]), 1):
        choices, label = r["choices"], r.get("label", r.get("gold"))
        if not isinstance(choices, list) or len(choices) < 2:
            raise ConfigError(f"{path}: example {i}: 'choices' must be a list of >= 2 strings")
        golds = tuple(label) if isinstance(label, list) else (label,)
        if not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < len(choices) for g in golds):
            raise ConfigError(f"{path}: example {i}: label {label!r} must be an index into its {len(choices)} choices")
        delim = str(r.get("delimiter", " "))
        out.append(MCExample(str(r["context"]), tuple(delim + str(c) for c in choices), golds))
    return out


@TASKS.register("boolq", help="BoolQ dev (3,270 yes/no reading comprehension), 0-shot, acc")
def boolq(data_dir=None) -> Task:
    return MultipleChoiceTask("boolq", lambda: _boolq(data_dir), {"split": "dev", "shots": 0, "format": "harness boolq"})


@TASKS.register("piqa", help="PIQA validation (1,838 physical commonsense, 2 choices), 0-shot, acc/acc_norm")
def piqa(data_dir=None) -> Task:
    return MultipleChoiceTask("piqa", lambda: _piqa(data_dir), {"split": "validation", "shots": 0, "format": "harness piqa"})


@TASKS.register("rte", help="RTE validation (277 entailment pairs, True/False), 0-shot, acc")
def rte(data_dir=None) -> Task:
    return MultipleChoiceTask("rte", lambda: _rte(data_dir), {"split": "validation", "shots": 0, "format": "harness glue rte"})


@TASKS.register("mmlu", help="MMLU test (57 subjects, 14,042 questions), 5-shot from dev; options shots, subjects=a+b")
def mmlu(data_dir=None, shots: int = 5, subjects: str | None = None) -> Task:
    shots = int(shots)
    if not 0 <= shots <= 5:
        raise ConfigError(f"mmlu shots={shots} is invalid: the dev split has 5 questions per subject (0-5)")
    return MultipleChoiceTask("mmlu", lambda: _mmlu(data_dir, shots, "test", subjects),
                              {"split": "test", "shots": shots, "fewshot_source": "dev (first k)",
                               "subjects": subjects or "all 57", "order": "round-robin over subjects"})


def bigbench_task(spec: str, data_dir=None, shots: int = 0) -> Task:
    """Any BIG-bench ``task.json`` (multiple choice or generative) by path or data-dir name."""
    from .generation import bigbench_generation_task

    path, task = load_bigbench(spec, data_dir)
    name = task.get("name") or path.parent.name
    if all("target_scores" in ex for ex in task["examples"]):
        return MultipleChoiceTask(name, lambda: bigbench_mc(task, int(shots)),
                                  {"source": str(path), "shots": int(shots), "format": "BIG-bench json prefixes",
                                   "order": "seeded shuffle (1234)"})
    return bigbench_generation_task(name, path, task, shots=int(shots) if shots else 3)


@TASKS.register("general_knowledge", help="BIG-bench general_knowledge (70 questions, multiple choice), 0-shot")
def general_knowledge(data_dir=None, shots: int = 0) -> Task:
    return bigbench_task("general_knowledge", data_dir, shots)


@TASKS.register("social_iqa", help="BIG-bench social_iqa (1,954 questions, 3 choices), 0-shot")
def social_iqa(data_dir=None, shots: int = 0) -> Task:
    return bigbench_task("social_iqa", data_dir, shots)


def jsonl_mc_task(spec: str) -> Task:
    """``mc:FILE.jsonl``: rows ``{"context", "choices": [...], "label": index}`` (see docs/evaluation.md)."""
    path = existing_file(spec, "multiple-choice JSONL")
    return MultipleChoiceTask(path.stem, lambda: _generic_mc(path), {"source": str(path), "format": "jsonl mc"})
