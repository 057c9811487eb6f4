"""Datasets and calibration sampling (the literature's protocol, seeded, reproducible)."""

import random

import pytest
import torch

from conftest import tiny_tokenizer
from prunekit.config import CalibConfig
from prunekit.data import CalibrationError, calibration_ids, get_dataset, sample_packed, sample_windows, tokenize


def test_wikitext2_rows_rebuild_the_hf_split(data_dir):
    ds = get_dataset("wikitext2")
    rows = ds.documents("test")
    assert len(rows) == 4358
    nonempty = [r for r in rows if r]
    ref = (data_dir / "wikitext-2-raw" / "wiki.test.hf-nonempty-rows.crlf.raw").read_bytes().decode("utf-8")
    ref_rows = [line + "\n" for line in ref.replace("\r\n", "\n").split("\n") if line]
    assert len(nonempty) == 2891
    assert nonempty == ref_rows
    text = ds.eval_text()
    assert text.startswith(" \n\n = Robert Boulter = \n") or text.startswith("\n\n = Robert Boulter = \n")


def _reference_draws(docs, tok, nsamples, seqlen, seed):
    """The reference get_c4 loop, re-derived with the global ``random`` module."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i])["input_ids"]
            if len(ids) > seqlen:
                break
        j = random.randint(0, len(ids) - seqlen - 1)
        out.append(ids[j : j + seqlen])
    return torch.tensor(out)


def test_window_sampling_matches_the_reference_draw_sequence():
    tok = tiny_tokenizer(200)
    docs = ["the fox " * k for k in (1, 3, 40, 2, 60, 25)]
    got = sample_windows(docs, tok, nsamples=7, seqlen=16, seed=3)
    assert torch.equal(got, _reference_draws(docs, tok, 7, 16, 3))
    assert got.shape == (7, 16) and got.dtype == torch.long


def test_window_sampling_fails_clearly_when_no_document_is_long_enough():
    tok = tiny_tokenizer(200)
    with pytest.raises(CalibrationError, match="too little calibration text.*seqlen=64"):
        sample_windows(["short one", "another short"], tok, 2, 64, 0)


def test_packed_sampling_is_seeded():
    tok = tiny_tokenizer(200)
    docs = [f"question {i} the lazy dog" for i in range(50)]
    a = sample_packed(docs, tok, 4, 8, seed=1)
    assert torch.equal(a, sample_packed(docs, tok, 4, 8, seed=1))
    assert not torch.equal(a, sample_packed(docs, tok, 4, 8, seed=2))
    with pytest.raises(CalibrationError, match="too little"):
        sample_packed(docs[:1], tok, 1, 500, 0)


def test_named_calibration_sources(data_dir):
    tok = tiny_tokenizer(300)
    a = calibration_ids(CalibConfig("austen", nsamples=3, seqlen=64, seed=0), tok)
    b = calibration_ids(CalibConfig("austen", nsamples=3, seqlen=64, seed=0), tok)
    assert torch.equal(a, b) and a.shape == (3, 64)
    g = calibration_ids(CalibConfig("gsm8k", nsamples=2, seqlen=64), tok)  # short docs: packed
    assert g.shape == (2, 64)
    text = tok.decode(g[0])
    assert text.strip()


def test_jsonl_and_txt_files(tmp_path):
    tok = tiny_tokenizer(200)
    j = tmp_path / "d.jsonl"
    j.write_text('{"body": "' + "the fox " * 30 + '"}\n')
    ids = calibration_ids(CalibConfig(str(j), nsamples=2, seqlen=8, text_field="body"), tok)
    assert ids.shape == (2, 8)
    t = tmp_path / "d.txt"
    t.write_text("the lazy dog " * 30)
    assert calibration_ids(CalibConfig(str(t), nsamples=1, seqlen=8), tok).shape == (1, 8)
    assert get_dataset(str(t)).eval_text() == t.read_text()


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_DATA", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # no hub fallback
    with pytest.raises(FileNotFoundError, match="wikitext-2-raw/wiki.test.raw"):
        get_dataset("wikitext2").documents("test")


def test_tokenize_keeps_special_tokens_like_the_reference():
    tok = tiny_tokenizer(200)
    assert tokenize(tok, "the fox") == tok("the fox")["input_ids"]


def test_wikitext2_calibration_is_the_reference_get_wikitext2_draw(tmp_path):
    """Short rows are packed in order, joined with ' ', windows at seeded randint positions."""
    tok = tiny_tokenizer(200)
    (tmp_path / "wikitext-2-raw").mkdir()
    rows = [f" the quick brown fox number {i} jumps over the lazy dog \n" if i % 3 else "" for i in range(200)]
    (tmp_path / "wikitext-2-raw" / "wiki.train.raw").write_text("\n".join(r.rstrip("\n") for r in rows) + "\n")
    got = calibration_ids(CalibConfig("wikitext2", nsamples=5, seqlen=64, seed=7), tok, tmp_path)
    docs = get_dataset("wikitext2", tmp_path).documents("train")
    enc = tok(" ".join(docs))["input_ids"]
    random.seed(7)
    want = []
    for _ in range(5):
        i = random.randint(0, len(enc) - 64 - 1)
        want.append(enc[i : i + 64])
    assert torch.equal(got, torch.tensor(want))


def test_short_documents_fail_before_anything_is_tokenized(monkeypatch):
    import prunekit.data.calibration as cal

    calls = []
    monkeypatch.setattr(cal, "tokenize", lambda tok, text: calls.append(text) or [])
    with pytest.raises(CalibrationError, match=r"longest of 3 documents has 11 characters, fewer than seqlen=2048 "
                                                r"tokens; pack short documents with --packing"):
        cal.sample_windows(["short row 1", "row 2", "row 3"], None, 4, 2048, 0)
    assert calls == []
