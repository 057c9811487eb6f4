"""benchmarks/one_shot_render.py: ties at two stderr, tasks from --tasks or --full, structured pairs, targets."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def render(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("one_shot_render", None)
    import one_shot_render

    return one_shot_render.render


def _row(pattern="unstructured", sparsity=0.5, method="wanda", refine=None, nsamples=128, ppl=None, gsm=None,
         prune_s=None):
    rec = {"spec": {"pattern": pattern, "sparsity": sparsity, "method": method, "refine": refine,
                    "nsamples": nsamples, "seqlen": 1024, "describe": f"{method} {pattern}"}}
    if ppl is not None:
        rec["ppl@40"] = {"wikitext2": {"ppl": ppl}, "gsm8k": {"ppl": gsm}}
    if prune_s is not None:
        rec["prune"] = {"prune_s": prune_s}
    return rec


def _tasks(piqa, piqa_se, boolq=0.38, boolq_se=0.022):
    return {"piqa": {"metrics": {"acc": piqa}, "stderr": {"acc": piqa_se}, "n": 500},
            "boolq": {"metrics": {"acc": boolq}, "stderr": {"acc": boolq_se}, "n": 500}}


def test_tasks_table_marks_ties_at_two_combined_stderr_from_either_source(render):
    dense = _row(ppl=24.46, gsm=5.28) | {"tasks": {"tasks": _tasks(0.650, 0.021)}}
    tie = _row(ppl=47.95, gsm=10.2) | {"tasks": {"tasks": _tasks(0.592, 0.022)}}  # 0.058 <= 2 * 0.0304
    worse = _row(sparsity=0.7, ppl=250.0, gsm=51.0) | {"full": {"wikitext2": {"ppl": 260.0},
                                                                  "tasks": _tasks(0.520, 0.022)}}
    better = _row(ppl=30.0, gsm=6.0) | {"tasks": {"tasks": _tasks(0.720, 0.020)}}
    md = render({"rows": {"smol/dense": dense, "smol/a/50": tie, "smol/b/70": worse, "smol/c/50": better},
                 "runs": []})
    table = md.split("## Tasks")[1].split("## Runs")[0]
    assert "| `smol/dense` | 24.46 | – | 0.650 ± 0.021 (n=500) |" in table
    assert "0.592 ± 0.022 (n=500) (tie)" in table
    assert "| `smol/b/70` | 250.00 | 260.00 | 0.520 ± 0.022 (n=500) (worse)" in table
    assert "0.720 ± 0.020 (n=500) (better)" in table


def test_structured_rows_sit_beside_their_reconstruction(render):
    rows = {"smol/dense": _row(ppl=24.46, gsm=5.28),
            "smol32/slimgpt/channels25": _row("channels", 0.25, "slimgpt", nsamples=32, ppl=65.59, gsm=14.07,
                                              prune_s=164),
            "smol32/slimgpt+rec/channels25": _row("channels", 0.25, "slimgpt", "reconstruct", 32, 64.51, 13.41, 585)}
    md = render({"rows": rows, "runs": []})
    assert "| channels 25% | 32 x 1024 | slimgpt | 65.59 | 64.51 | 14.07 | 13.41 | 164 / 585 |" in md


def test_targets_pick_the_best_row_and_judge_it_against_the_bar(render):
    rows = {"smol/dense": _row(ppl=24.46, gsm=5.28),
            "smol/sparsegpt/2:4": _row("2:4", None, "sparsegpt", ppl=136.7, gsm=27.8, prune_s=448),
            "smol/sparsegpt+rec/2:4": _row("2:4", None, "sparsegpt", "reconstruct", ppl=99.5, gsm=21.0, prune_s=2476),
            "smol/alps/50": _row(method="alps", ppl=52.03, gsm=10.6, prune_s=1136)}
    md = render({"rows": rows, "runs": []})
    assert "| 2:4 | ≤ 100.00 | `smol/sparsegpt+rec/2:4` | 99.50 | – | yes |" in md
    assert "| 50 % unstructured | ≤ 36.69 | `smol/alps/50` | 52.03 | – | NO |" in md
    assert "| SparseGPT + reconstruct | – | – | – | – | 99.50 (2476 s) |" in md
