"""The tokenizer of a Hugging Face (fast) tokenizer as GGUF metadata, in the two forms llama.cpp reads.

* **Byte-level BPE** (GPT-2 style: SmolLM2, Qwen2, Llama 3): ``tokenizer.ggml.model = "gpt2"``, the
  tokens in id order (byte-level strings such as ``Ġthe``), the merges as ``"a b"`` in rank order,
  token types (normal; control for special added tokens; user-defined for other added ones) and
  ``tokenizer.ggml.pre``, the name of llama.cpp's pre-tokenizer regex. llama.cpp's own converter
  finds that name by hashing the token ids of a fixed test string; here it is read from the
  tokenizer's declared pre-tokenizer (a GPT-2 ``ByteLevel`` with its built-in regex -> ``gpt-2``;
  ``Digits`` then ``ByteLevel`` -> ``smollm``; a ``Split`` with Qwen2's or Llama 3's regex ->
  ``qwen2`` / ``llama-bpe``), or given explicitly (``pre=``). The name must describe what the
  tokenizer *does*, so that llama.cpp cuts text exactly as prunekit did when it measured the model.
* **SentencePiece-style BPE with byte fallback** (Gemma): ``tokenizer.ggml.model = "llama"``, the
  tokens with ``▁`` for spaces, byte tokens ``<0xNN>`` typed as bytes, and *scores*: llama.cpp's SPM
  tokenizer repeatedly merges the adjacent pair whose merged token has the highest score, which is
  BPE's rule when a token's score is minus the rank of the merge that makes it (tokens no merge
  makes get the lowest score).

Special ids (bos/eos/unk/pad), whether to add BOS, and the chat template are copied as well.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import gguf

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: llama.cpp pre-tokenizer names this module can recognise (others may be passed explicitly)
KNOWN_PRE = ("gpt-2", "smollm", "qwen2", "llama-bpe")


@dataclass
class Vocab:
    """Everything the GGUF tokenizer keys hold."""

    model: str  # "gpt2" | "llama"
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad -> id
    add_bos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre is not None:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
                  "pad": w.add_pad_token_id}
        for k, v in self.special.items():
            adders[k](v)
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer declaration, or None if not recognised."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers", [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in regex:
            return "llama-bpe"
        if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex and "\\p{N}|" in regex:
            return "qwen2"
    return None


def _tokens_by_id(model: dict, added: list[dict], size: int) -> tuple[list[str], dict[int, dict]]:
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    extra = {a["id"]: a for a in added}
    for i, a in extra.items():
        by_id[i] = a["content"]
    n = max(size, max(by_id) + 1)
    return [by_id.get(i, f"[PAD{i}]") for i in range(n)], extra


def _types(tokens: list[str], extra: dict[int, dict], byte_tokens: bool) -> list[int]:
    T = gguf.TokenType
    out = []
    for i, t in enumerate(tokens):
        if i in extra:
            out.append(T.CONTROL if extra[i].get("special") else T.USER_DEFINED)
        elif t.startswith("[PAD") and t.endswith("]"):
            out.append(T.UNUSED)
        elif byte_tokens and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out.append(T.BYTE)
        else:
            out.append(T.NORMAL)
    return [int(x) for x in out]


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _special(tokenizer) -> dict[str, int]:
    out = {}
    for k in ("bos", "eos", "unk", "pad"):
        v = getattr(tokenizer, f"{k}_token_id", None)
        if isinstance(v, int) and v >= 0:
            out[k] = v
    return out


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a plain encode (what llama.cpp should do too)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == bos


def vocab_from_tokenizer(tokenizer, vocab_size: int, pre: str | None = None) -> Vocab:
    """The GGUF vocabulary of a Hugging Face fast tokenizer.

    Raises:
        ConfigError: a tokenizer llama.cpp cannot be given faithfully (not a fast BPE tokenizer, or a
            byte-level pre-tokenizer this module does not recognise and ``pre`` was not given).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend; GGUF export "
                          "needs its vocabulary and merges: save the model with a fast tokenizer")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer model {model.get('type')!r} is not supported for GGUF export (BPE only: "
                          "byte-level like GPT-2/SmolLM2/Qwen2, or SentencePiece-style with byte fallback like Gemma)")
    tokens, extra = _tokens_by_id(model, spec.get("added_tokens", []), vocab_size)
    template = getattr(tokenizer, "chat_template", None)
    template = template if isinstance(template, str) else None
    common = dict(special=_special(tokenizer), add_bos=_adds_bos(tokenizer), chat_template=template)
    if model.get("byte_fallback"):
        return _spm_vocab(model, tokens, extra, common)
    name = pre or _pre_name(spec.get("pre_tokenizer"))
    if name is None:
        raise ConfigError(f"cannot tell llama.cpp's name for this tokenizer's pre-tokenizer "
                          f"{json.dumps(spec.get('pre_tokenizer'))[:120]}; pass --tokenizer-pre NAME (a "
                          f"tokenizer.ggml.pre value llama.cpp knows, e.g. {', '.join(KNOWN_PRE)})")
    merges = _merges(model)
    if not merges:
        raise ConfigError("this byte-level BPE tokenizer has no merges, and llama.cpp's gpt2 tokenizer cannot load "
                          "without them: export a model whose tokenizer.json lists its merges")
    return Vocab("gpt2", tokens, _types(tokens, extra, False), pre=name, merges=merges, **common)


def _spm_vocab(model: dict, tokens: list[str], extra: dict[int, dict], common: dict) -> Vocab:
    rank = {}
    for r, m in enumerate(_merges(model)):
        a, b = m.split(" ", 1)
        rank.setdefault(a + b, r)
    # a token no merge makes is never a merge's result (BPE would not produce it): lowest priority
    scores = [-float(rank[t]) if t in rank else -1e9 for t in tokens]
    return Vocab("llama", tokens, _types(tokens, extra, True), scores=scores, add_space_prefix=False, **common)
