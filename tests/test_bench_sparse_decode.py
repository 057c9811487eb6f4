"""benchmarks/bench_sparse_decode.py: the prefill stage (one entry per prompt length) and its table."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import tiny_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def rows(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_DECODE_JSON", str(tmp_path / "sd.json"))
    monkeypatch.syspath_prepend(str(BENCH))
    for m in ("bench_sparse_decode", "sparse_decode_rows", "sparse_decode_render"):
        sys.modules.pop(m, None)
    import sparse_decode_rows

    monkeypatch.setattr(sparse_decode_rows.prunekit, "load_model", lambda name, dtype: (tiny_model("llama"), None))
    return sparse_decode_rows


def test_prefill_stage_times_every_length_and_renders_them(rows, tmp_path):
    args = SimpleNamespace(model="smollm2-135m", dtypes=["float32"], rows=["layout/W^T"], prefill_lengths=[8, 24],
                           repeats=1, redo=False)
    data = {"runs": [], "kernels": {}, "quality": {}, "speed": {}}
    rows.stage_prefill(args, data)
    got = data["prefill"]["smollm2-135m"]["float32"]["layout/W^T"]["lengths"]
    assert list(got) == ["8", "24"]
    for x in got.values():
        d, s = x["dense"]["prefill_s"]["median"], x["sparse"]["prefill_s"]["median"]
        assert d > 0 and s > 0 and x["prefill_speedup"] == pytest.approx(d / s)
    md = (tmp_path / "sd.md").read_text()
    assert "## Prefill against prompt length: smollm2-135m" in md
    assert "| layout/W^T | float32 | 24 |" in md
    rows.stage_prefill(args, data)  # resumable: a finished row is not measured again
    assert data["prefill"]["smollm2-135m"]["float32"]["layout/W^T"]["lengths"] is got


def test_dense_prompt_is_added_to_measured_rows_and_rendered(rows, monkeypatch):
    seen = []

    def fake_ppl(model, tok, ds, seqlen, windows, batch, prompt=0):
        seen.append((ds, seqlen, prompt))
        return SimpleNamespace(ppl=20.0 if len(seen) == 1 else 22.0, windows=windows, tokens=windows * (seqlen - prompt))

    monkeypatch.setattr(rows, "perplexity", fake_ppl)
    monkeypatch.setattr(rows, "build", lambda label, name, dtype, args, ids=None: (tiny_model("llama"), None))
    monkeypatch.setattr(rows.prunekit.formats, "load_tokenizer", lambda name: None)
    monkeypatch.setattr(rows, "_calib", lambda args, tok: None)
    base = {"dtype": "bfloat16", "blocks": 2, "wikitext2": {"ppl": 10.0, "windows": 3}, "gsm8k": {"ppl": 5.0}}
    data = {"runs": [], "quality": {"smollm2-135m": {"dense": dict(base),
                                                     "act/teal/uniform/0.4": {**base, "wikitext2": {"ppl": 12.0}}}}}
    args = SimpleNamespace(model="smollm2-135m", rows=None, redo=False, piqa=0, add_tasks=False, dense_prompt=True,
                           windows=3)
    monkeypatch.setattr(rows, "QUALITY", {"smollm2-135m": ["dense", "act/teal/uniform/0.4"]})
    rows.stage_quality(args, data)
    assert seen == [("wikitext2", 1024, rows.PROMPT)] * 2
    tab = data["quality"]["smollm2-135m"]
    assert tab["act/teal/uniform/0.4"]["wikitext2"]["ppl"] == 12.0  # kept
    assert tab["act/teal/uniform/0.4"]["wikitext2_prompt"]["ppl"] == 22.0
    from sparse_decode_render import _prompt_quality

    md = "\n".join(_prompt_quality("smollm2-135m", tab))
    assert "| act/teal/uniform/0.4 | 22.00 | +10.0% | +20.0% |" in md
