"""Whether two models share a tokenizer — checked from the tokenizer files alone, before any weight loads.

Distillation compares the teacher's and the student's predictions token by token, so token ``i``
must mean the same text to both. The same vocabulary *size* is not enough: Llama-2 and Mistral
both have 32,000 tokens that map to different strings. Two tokenizers match here when their
vocabulary (token → id), merges, model settings, normalizer, pre-tokenizer, added tokens and
special tokens (BOS, EOS, UNK) are all equal.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError
from .load import load_tokenizer

_SPECIAL = ("bos_token", "eos_token", "unk_token")


def tokenizer_parts(tok) -> dict[str, Any]:
    """The parts of ``tok`` that decide which id a text gets (JSON-able)."""
    parts: dict[str, Any] = {}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        model = dict(data.get("model") or {})
        parts["vocabulary"] = model.pop("vocab", None)
        parts["merges"] = model.pop("merges", None)
        parts["model settings"] = model
        parts["normalizer"] = data.get("normalizer")
        parts["pre-tokenizer"] = data.get("pre_tokenizer")
        parts["added tokens"] = sorted((t.get("id"), t.get("content"), bool(t.get("special")))
                                       for t in data.get("added_tokens") or [])
    else:  # a slow tokenizer: its vocabulary is what it exposes
        parts["vocabulary"] = tok.get_vocab()
    parts["special tokens"] = {k: [getattr(tok, k, None), getattr(tok, f"{k}_id", None)] for k in _SPECIAL}
    return parts


def _example(a: dict, b: dict) -> str:
    """One token whose id differs between two vocabularies (token → id maps), for the message."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ""
    for token in sorted(a, key=lambda t: (a[t], t)):
        if b.get(token) != a[token]:
            other = f"id {b[token]}" if token in b else "absent"
            return f" (e.g. {token!r} is id {a[token]} for the student, {other} for the teacher)"
    return ""


def tokenizer_differences(a, b) -> list[str]:
    """What differs between tokenizers ``a`` and ``b`` (empty when they tokenize alike), in words."""
    pa, pb = tokenizer_parts(a), tokenizer_parts(b)
    out = []
    for key in pa.keys() | pb.keys():
        if json.dumps(pa.get(key), sort_keys=True, default=str) != json.dumps(pb.get(key), sort_keys=True, default=str):
            out.append(key + (_example(pa[key], pb.get(key)) if key == "vocabulary" else ""))
    order = ["vocabulary", "merges", "special tokens", "added tokens", "normalizer", "pre-tokenizer", "model settings"]
    return sorted(out, key=lambda s: next((i for i, k in enumerate(order) if s.startswith(k)), len(order)))


def check_same_tokenizer(student: str, teacher: str, trust_remote_code: bool = False) -> None:
    """Refuse, in one line and before any weights load, a teacher whose tokenizer is not the student's.

    Raises:
        ConfigError: naming both models and what differs.
    """
    a = load_tokenizer(student, trust_remote_code)
    b = load_tokenizer(teacher, trust_remote_code)
    diff = tokenizer_differences(a, b)
    if diff:
        size = f"both have {len(a)} tokens, but " if len(a) == len(b) else f"{len(a)} vs {len(b)} tokens; "
        raise ConfigError(f"teacher {teacher!r} and student {student!r} have different tokenizers ({size}"
                          f"{' and '.join(diff)} differ); distillation compares predictions token by token, so give "
                          "as --teacher the dense model the student was pruned from")
