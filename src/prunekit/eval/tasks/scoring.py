"""Pure scoring functions (no model): the metric definitions, tested on hand-built numbers.

Definitions follow lm-evaluation-harness (Gao et al., 2021-2024) so numbers are comparable:

* ``acc``: the choice with the highest total log-likelihood ``sum_t log p(c_t | ctx, c_<t)`` is
  the prediction; accuracy is the fraction of predictions that are gold.
* ``acc_norm``: the same with each log-likelihood divided by the choice's length in
  *characters* (the continuation string, leading space included), as the harness does.
* ``stderr``: standard error of a mean of per-example scores, ``std(x, ddof=1) / sqrt(n)``
  (the harness's ``mean_stderr``).
* exact match for factoid QA: SQuAD's answer normalization (lower case, drop punctuation and
  the articles a/an/the, collapse whitespace), compared with every gold answer.
* GSM8K: the harness's ``strict-match`` (the number after ``####``) and ``flexible-extract``
  (the last number in the generation), compared after removing ``,``/``$`` and trailing ``.``.
"""

from __future__ import annotations

import math
import re
import string
from typing import Sequence
from ...errors import ConfigError


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error ``std(ddof=1) / sqrt(n)`` (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ConfigError("no examples were scored; check the task file and --limit")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def argmax(xs: Sequence[float]) -> int:
    """Index of the first maximum (ties go to the earlier choice, as ``numpy.argmax``)."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def mc_predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of the log-likelihoods, raw and per character of the choice."""
    if len(loglikelihoods) != len(choices) or not choices:
        raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {len(choices)} choices")
    norm = [ll / max(1, len(c)) for ll, c in zip(loglikelihoods, choices)]
    return argmax(loglikelihoods), argmax(norm)


def mc_metrics(all_lls: Sequence[Sequence[float]], all_choices: Sequence[Sequence[str]],
               golds: Sequence[Sequence[int] | int]) -> tuple[dict[str, float], dict[str, float]]:
    """``acc`` and ``acc_norm`` with standard errors over examples.

    ``golds[i]`` is the gold index or a collection of acceptable indices (BIG-bench tasks may
    mark several choices correct).
    """
    acc, acc_norm = [], []
    for lls, choices, gold in zip(all_lls, all_choices, golds):
        ok = {gold} if isinstance(gold, int) else set(gold)
        pred, pred_norm = mc_predictions(lls, choices)
        acc.append(1.0 if pred in ok else 0.0)
        acc_norm.append(1.0 if pred_norm in ok else 0.0)
    m_acc, s_acc = mean_stderr(acc)
    m_norm, s_norm = mean_stderr(acc_norm)
    return {"acc": m_acc, "acc_norm": m_norm}, {"acc": s_acc, "acc_norm": s_norm}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized answer."""
    pred = normalize_answer(prediction)
    return 1.0 if any(pred == normalize_answer(a) for a in answers) else 0.0


def contains_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any normalized answer occurs in the normalized prediction as whole words."""
    pred = f" {normalize_answer(prediction)} "
    return 1.0 if any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers) else 0.0


_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def clean_number(text: str | None) -> str | None:
    """``"$1,234."`` → ``"1234"``; ``"18.00"`` → ``"18"``; not a number → ``None``."""
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def extract_strict(generation: str) -> str | None:
    """The number after the first ``#### `` (GSM8K's answer marker), else ``None``."""
    m = _STRICT.search(generation)
    return clean_number(m.group(1)) if m else None


def extract_flexible(generation: str) -> str | None:
    """The last number in the generation, else ``None``."""
    found = _FLEX.findall(generation)
    for a, b in reversed(found):
        value = clean_number(a or b)
        if value is not None:
            return value
    return None


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K answer (``... #### 18``) or a bare number."""
    value = extract_strict(answer)
    if value is None:
        value = clean_number(answer)
    if value is None:
        raise ConfigError(f"answer {answer!r} has no final number (expected '#### <number>' or a number)")
    return value
