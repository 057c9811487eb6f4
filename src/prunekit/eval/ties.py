"""When two task scores differ, and when they only seem to: the tie rule every results table uses.

Two accuracies measured on finite samples differ by chance. prunekit calls a difference a **tie**
when it lies inside two standard errors *of the difference*:

    |a - b| <= k * sqrt(se_a**2 + se_b**2),  k = 2

(each ``se`` is the sample standard error of its mean, as :class:`~prunekit.eval.tasks.TaskResult`
reports it). For two models scored on the same examples the combined error is an upper bound
(their errors are positively correlated), so the rule errs towards "tie": a table can understate
a real difference, never invent one. At n = 500 and accuracies near 0.6 a difference must exceed
about 0.06 to count; at n = 60 about 0.18.

``mark`` / ``verdict`` turn this into the cell text the benchmark renderers print.
"""

from __future__ import annotations

import math

K = 2.0
TIE = "≈"  # the mark a renderer puts on a value that ties with its reference


def diff_stderr(se_a: float | None, se_b: float | None) -> float | None:
    """Standard error of ``a - b`` for independent estimates; ``None`` when either is unknown."""
    if se_a is None or se_b is None or not (math.isfinite(se_a) and math.isfinite(se_b)):
        return None
    return math.sqrt(se_a * se_a + se_b * se_b)


def is_tie(a: float, se_a: float | None, b: float, se_b: float | None, k: float = K) -> bool | None:
    """True when ``a`` and ``b`` differ by at most ``k`` standard errors of their difference.

    Returns ``None`` when a standard error is unknown (the difference cannot be judged).
    """
    se = diff_stderr(se_a, se_b)
    if se is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return abs(a - b) <= k * se


def verdict(a: float, se_a: float | None, b: float, se_b: float | None, higher_is_better: bool = True,
            k: float = K) -> str:
    """``"tie"``, ``"better"`` or ``"worse"`` for ``a`` against the reference ``b`` (``"?"``: no stderr)."""
    tie = is_tie(a, se_a, b, se_b, k)
    if tie is None:
        return "?"
    if tie:
        return "tie"
    return "better" if (a > b) == higher_is_better else "worse"


def mark(a: float, se_a: float | None, b: float | None, se_b: float | None, digits: int = 3,
         higher_is_better: bool = True) -> str:
    """``"0.652±0.021 ≈"`` when ``a`` ties with the reference ``b``, ``"0.652±0.021 ↓"`` / ``"↑"`` when it is
    clearly worse / better, and no mark without a reference or a standard error."""
    text = f"{a:.{digits}f}" + (f"±{se_a:.{digits}f}" if se_a is not None else "")
    if b is None:
        return text
    v = verdict(a, se_a, b, se_b, higher_is_better)
    return text + {"tie": f" {TIE}", "better": " ↑", "worse": " ↓"}.get(v, "")
