"""The tie rule of every results table (prunekit.eval.ties) and the recovery renderer that uses it."""

import math
import sys
from pathlib import Path

import pytest

from prunekit.eval.ties import TIE, diff_stderr, is_tie, mark, verdict

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_difference_stderr_combines_both_errors():
    assert diff_stderr(0.03, 0.04) == pytest.approx(0.05)
    assert diff_stderr(None, 0.04) is None and diff_stderr(0.03, float("nan")) is None


def test_tie_is_inside_two_stderr_of_the_difference():
    # se of the difference = 0.05: |diff| <= 0.10 is a tie, above it is not
    assert is_tie(0.60, 0.03, 0.69, 0.04) is True
    assert is_tie(0.60, 0.03, 0.70, 0.04) is True  # on the boundary: still a tie
    assert is_tie(0.60, 0.03, 0.7001, 0.04) is False
    assert is_tie(0.60, 0.03, 0.49, 0.04) is False
    assert is_tie(0.6, 0.03, 0.7, 0.04, k=1.0) is False  # k is the multiple of the stderr
    assert is_tie(0.6, None, 0.7, 0.04) is None  # an unknown stderr cannot be judged
    assert is_tie(float("nan"), 0.01, 0.7, 0.04) is None


def test_the_issue_example_is_all_ties():
    # OBQA, 300 items: 0.293 -> 0.313, dense 0.330 (issue 27): every pair within 2 stderr
    se = lambda p: math.sqrt(p * (1 - p) / 299)  # noqa: E731 - sample std / sqrt(n)
    for a, b in ((0.293, 0.313), (0.313, 0.330), (0.293, 0.330)):
        assert is_tie(a, se(a), b, se(b))


def test_verdict_follows_the_metric_direction():
    assert verdict(0.80, 0.01, 0.60, 0.01) == "better"
    assert verdict(0.40, 0.01, 0.60, 0.01) == "worse"
    assert verdict(0.61, 0.01, 0.60, 0.01) == "tie"
    assert verdict(0.40, 0.01, 0.60, 0.01, higher_is_better=False) == "better"
    assert verdict(0.40, None, 0.60, 0.01) == "?"


def test_mark_prints_value_stderr_and_the_verdict():
    assert mark(0.652, 0.021, 0.66, 0.021) == f"0.652±0.021 {TIE}"
    assert mark(0.752, 0.019, 0.60, 0.022) == "0.752±0.019 ↑"
    assert mark(0.452, 0.022, 0.60, 0.022) == "0.452±0.022 ↓"
    assert mark(0.652, 0.021, None, None) == "0.652±0.021"
    assert mark(0.652, None, 0.6, 0.02) == "0.652"


def _eval(ppl: float, acc: float, se: float, n: int = 500, held: float | None = None) -> dict:
    ev = {"wikitext2": {"ppl": ppl}, "tasks": {"piqa": {"metrics": {"acc": acc}, "stderr": {"acc": se}, "n": n}}}
    if held is not None:
        ev["heldout"] = {"kjv": {"ppl": held}}
    return ev


def _row(student: str, before: dict, after: dict, tokens: int = 1024) -> dict:
    return {"student": student, "recipe": "kd", "recipe_label": "distill", "data": "wt2valid", "label": student,
            "report": {"tokens": tokens, "evaluation": {"before": before, "after": after}}}


def test_recovery_renderer_reports_the_control_ratio_and_ties(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("render_recover", None)
    import render_recover as rr

    dense = _eval(20.0, 0.65, 0.02, held=40.0)
    res = {"students": {"dense": {"eval": dense}},
           "rows": {"h-x": _row("w50", _eval(50.0, 0.60, 0.02, held=90.0), _eval(30.0, 0.63, 0.02, held=60.0)),
                    "ctrl": _row("dense", dense, _eval(18.0, 0.66, 0.02, held=41.0)),
                    "h-y": _row("w70", _eval(99.0, 0.55, 0.02, held=99.0), _eval(50.0, 0.50, 0.02, held=80.0), 2048)}}
    assert rr.control_of(res, res["rows"]["h-x"]) is res["rows"]["ctrl"]
    assert rr.control_of(res, res["rows"]["h-y"]) is None  # other token budget: no control
    text = "\n".join(rr.honest(res))
    assert "| WikiText-2 test | 50.00 | 30.00 | 20.00 | 18.00 (ctrl) | 1.50× | **1.67×** | 2.50× |" in text
    assert "| King James Bible | 90.00 | 60.00 | 40.00 | 41.00 (ctrl) | 1.50× | **1.46×** | 2.25× |" in text
    assert "not run" in text  # h-y's missing control is said, not hidden
    # h-x piqa 0.63 vs one-shot 0.60 / dense 0.65 / tuned 0.66: all inside 2 x 0.028 -> ties
    assert "| h-x | piqa | 500 | 0.600±0.020 | 0.630±0.020 | 0.650±0.020 | 0.660±0.020 | tie | tie | tie |" in text
    # h-y piqa 0.50 vs dense 0.65: 0.15 > 0.057 -> worse
    assert "| h-y | piqa | 500 | 0.550±0.020 | 0.500±0.020 | 0.650±0.020 | not run | tie | worse | - |" in text
