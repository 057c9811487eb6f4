"""Text datasets: the interface, the data-directory setting and name/path resolution.

A dataset yields *documents* (a list of strings) per split, and the *evaluation text* of a
split (the documents joined the way the literature does it, e.g. ``"\\n\\n".join`` for
WikiText-2). Named datasets are looked up in the data directory (``--data-dir`` or
``PRUNEKIT_DATA``) and fall back to the Hugging Face hub (``datasets`` package) for users who
are online.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import ClassVar

from ..registry import DATASETS
from ..errors import ConfigError

log = logging.getLogger(__name__)


class DataNotFoundError(FileNotFoundError):
    """A dataset is neither in the data directory nor reachable on the hub."""


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data directory: the explicit setting, else ``$PRUNEKIT_DATA``, else none."""
    value = explicit or os.environ.get("PRUNEKIT_DATA")
    if not value:
        return None
    p = Path(value).expanduser()
    if not p.is_dir():
        raise DataNotFoundError(f"data directory {str(p)!r} does not exist; fix --data-dir / PRUNEKIT_DATA")
    return p


class TextDataset:
    """Base class of registered text datasets."""

    name: ClassVar[str] = ""
    calib_split: ClassVar[str] = "train"
    eval_split: ClassVar[str] = "test"
    #: documents are short (e.g. GSM8K problems): calibration windows are cut from the
    #: concatenated stream instead of from inside one document.
    packed: ClassVar[bool] = False
    #: packed calibration: shuffle the documents (seeded) before joining them (GSM8K), or keep their
    #: order as the reference ``get_wikitext2`` does
    shuffle_packed: ClassVar[bool] = True
    #: how packed calibration joins documents (the reference joins WikiText-2 train rows with " ")
    calib_joiner: ClassVar[str] = "\n\n"
    joiner: ClassVar[str] = "\n\n"

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = data_dir

    def documents(self, split: str) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def eval_text(self, split: str | None = None) -> str:
        return self.joiner.join(self.documents(split or self.eval_split))

    def eval_token_limit(self, seqlen: int) -> int | None:
        """Cap on evaluation tokens the protocol imposes (C4: 256 windows), if any."""
        return None

    # helpers for subclasses -------------------------------------------------------------
    def local(self, *parts: str) -> Path | None:
        if self.data_dir is None:
            return None
        p = self.data_dir.joinpath(*parts)
        return p if p.exists() else None

    def missing(self, split: str, expected: str) -> DataNotFoundError:
        where = f"data directory {str(self.data_dir)!r}" if self.data_dir else "no data directory (set --data-dir or PRUNEKIT_DATA)"
        return DataNotFoundError(
            f"dataset {self.name!r} split {split!r} not found: looked for {expected} in {where}, and the "
            "Hugging Face hub is not reachable (install `datasets` and go online, or point the data "
            "directory at a local copy)"
        )


def hub_texts(split: str, path: str, name: str | None = None, field: str = "text", **kw) -> list[str]:
    """Load a split from the Hugging Face hub (online users only)."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise DataNotFoundError(f"hub fallback for {path!r} needs the `datasets` package") from e
    try:
        ds = datasets.load_dataset(path, name, split=split, **kw)
    except Exception as e:  # network, missing dataset, ...: all the same to the user
        raise DataNotFoundError(f"could not load {path!r} ({split}) from the hub: {e}") from e
    return [row[field] for row in ds]


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a binary or otherwise undecodable file is a one-line error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "pass a text file (.txt, or .jsonl with one JSON object per line)") from None


def jsonl_rows(path: Path):
    """``(line number, object)`` for each non-blank line of a JSON-lines file, with errors that
    name the file, the line and what is wrong."""
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix the line") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object with fields")
        yield lineno, row


class TextFile(TextDataset):
    """A local ``.txt`` file: one document (the whole file)."""

    name = "file"

    def __init__(self, path: Path) -> None:
        super().__init__(None)
        self.path = path
        self.name = str(path)

    def documents(self, split: str) -> list[str]:
        return [read_text(self.path)]

    def eval_text(self, split: str | None = None) -> str:
        return read_text(self.path)


class JsonlFile(TextDataset):
    """A local ``.jsonl`` file: one document per line, text in ``field``."""

    name = "jsonl"

    def __init__(self, path: Path, field: str = "text") -> None:
        super().__init__(None)
        self.path, self.field = path, field
        self.name = str(path)

    def documents(self, split: str) -> list[str]:
        docs = []
        for lineno, row in jsonl_rows(self.path):
            if self.field not in row:
                raise ConfigError(
                    f"{self.path}:{lineno} has no field {self.field!r} (it has: {', '.join(row) or 'none'}); "
                    "choose the text field with --text-field"
                )
            docs.append(str(row[self.field]))
        if not docs:
            raise ConfigError(f"{self.path} has no documents")
        return docs


def get_dataset(spec: str, data_dir_path: str | os.PathLike | None = None, text_field: str = "text") -> TextDataset:
    """Resolve a registered name or a ``.txt``/``.jsonl`` path to a dataset object."""
    if spec in DATASETS:
        return DATASETS.get(spec)(data_dir(data_dir_path))
    p = Path(spec).expanduser()
    if p.suffix in (".txt", ".jsonl", ".json") or p.exists():
        if not p.is_file():
            raise DataNotFoundError(f"dataset file {spec!r} does not exist; pass an existing .txt or .jsonl file")
        if p.suffix in (".jsonl", ".json"):
            return JsonlFile(p, text_field)
        return TextFile(p)
    raise ConfigError(f"unknown dataset {spec!r}; choose one of: {', '.join(DATASETS.names())}, or a .txt/.jsonl path")
