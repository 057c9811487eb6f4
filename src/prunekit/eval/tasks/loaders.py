"""File formats: the data directory's benchmark files, BIG-bench ``task.json``, generic JSONL.

Every reader raises ``ValueError`` naming the file, the line and the missing/bad field, and
``DataNotFoundError`` (a ``FileNotFoundError``) naming the path it looked for.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from ...data import DataNotFoundError, data_dir
from ...data.base import jsonl_rows, read_text
from ...errors import ConfigError

#: seed of the deterministic shuffles (BIG-bench example order, GSM8K exemplars)
SEED = 1234


def data_file(data_dir_path, *parts: str, task: str) -> Path:
    """``<data dir>/<parts…>``, or a clear error saying where it looked."""
    root = data_dir(data_dir_path)
    if root is None:
        raise DataNotFoundError(
            f"task {task!r} reads {'/'.join(parts)} from the data directory, but none is set; "
            "pass --data-dir or set PRUNEKIT_DATA"
        )
    path = root.joinpath(*parts)
    if not path.exists():
        raise DataNotFoundError(f"task {task!r}: {path} does not exist; point --data-dir at a copy that has it")
    return path


def existing_file(spec: str, what: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {spec!r} does not exist; pass the path of an existing file")
    return path


def read_jsonl(path: Path, required: Sequence[Sequence[str]] = ()) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; ``required`` lists groups of alternative field names."""
    rows = []
    for lineno, row in jsonl_rows(Path(path)):
        for group in required:
            if not any(k in row for k in group):
                raise ConfigError(
                    f"{path}:{lineno} has no field {' or '.join(repr(k) for k in group)} "
                    f"(it has: {', '.join(row) or 'none'}); see docs/evaluation.md for the format"
                )
        rows.append(row)
    if not rows:
        raise ConfigError(f"{path} has no examples")
    return rows


def shuffled(items: list, seed: int = SEED) -> list:
    """A copy in a fixed pseudo-random order (same on every machine and run)."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def load_bigbench(spec: str, data_dir_path=None) -> tuple[Path, dict[str, Any]]:
    """A BIG-bench ``task.json``: a path, a folder holding one, or a task name in ``<data dir>/bigbench``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "task.json"
    if not path.is_file():
        if "/" in spec or spec.endswith(".json"):
            raise FileNotFoundError(f"BIG-bench task file {spec!r} does not exist; pass a task.json path")
        path = data_file(data_dir_path, "bigbench", spec, "task.json", task=f"bigbench:{spec}")
    try:
        task = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    examples = task.get("examples") if isinstance(task, dict) else None
    if not examples or not isinstance(examples, list):
        raise ConfigError(f"{path} has no 'examples' list; is it a BIG-bench task.json (programmatic tasks are not supported)?")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "input" not in ex or not ("target_scores" in ex or "target" in ex):
            raise ConfigError(f"{path}: example {i} needs 'input' and 'target_scores' or 'target'")
    return path, task


def as_answers(value: Any, where: str) -> tuple[str, ...]:
    answers = tuple(str(a) for a in value) if isinstance(value, (list, tuple)) else (str(value),)
    if not answers or not all(a.strip() for a in answers):
        raise ConfigError(f"{where}: empty answer; give a non-empty string or list of strings")
    return answers
