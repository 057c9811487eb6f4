"""benchmarks/bench_recover.py helpers: pausing a long row at a checkpoint, the recovered-model index."""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("bench_recover", None)
    import bench_recover

    return bench_recover


def test_pause_only_at_a_checkpointed_step_after_the_budget(bench):
    info = lambda step, total=32: SimpleNamespace(step=step, total_steps=total)  # noqa: E731
    cb = bench.pause_after(1e-9, 8)
    time.sleep(0.01)
    cb(info(7))  # not a checkpoint step: keep going
    with pytest.raises(bench.Paused) as e:
        cb(info(8))
    assert e.value.args == (8,)
    cb(info(32, 32))  # the last step is never a pause (the row finishes and is evaluated)
    bench.pause_after(None, 8)(info(8))  # no budget: never pauses
    bench.pause_after(60, 8)(info(8))  # budget not reached


def test_index_lists_each_saved_row_once(bench, tmp_path):
    row = {"label": "Wanda 50%", "recipe_label": "distill", "data": "wt2valid", "report": {"tokens": 65536},
           "saved_to": "/x/h-w50", "saved_as": "plain safetensors: reload with transformers"}
    bench.index_line(tmp_path, "h-w50", row)
    bench.index_line(tmp_path, "h-w50", {**row, "saved_to": "/y/h-w50"})  # a rerun replaces its line
    text = (tmp_path / "INDEX.md").read_text()
    assert text.count("| h-w50 |") == 1 and "/y/h-w50 | plain safetensors |" in text and "65,536" in text


def test_every_honest_row_has_a_control_with_the_same_recipe_text_and_tokens(bench):
    rows = bench.ROWS
    for name, (student, recipe, data, tokens) in rows.items():
        if name.startswith("h-"):
            assert any(s == "dense" and (r, d, t) == (recipe, data, tokens) for s, r, d, t in rows.values()), name
