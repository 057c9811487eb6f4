"""Load a causal LM and its tokenizer from a folder, a GGUF file, a hub id or an alias.

:func:`load_model` resolves what the user typed (:mod:`.sources`), turns a GGUF file into its cached
safetensors folder (:mod:`.gguf_read`), asks every registered format (:data:`~.base.FORMATS`, in
order) which one the folder is in, lets that format refuse what it cannot load safely, and loads;
then every overlay format (the activation thresholds) installs what it keeps in the folder. Weights
are loaded from safetensors; remote code only runs when the caller asks for it.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models.runtime import resolve_device, resolve_dtype
from .base import Format, detect, overlays, pickle_files
from .dense import DENSE
from .gguf_read import materialized
from .sources import ModelSource, resolve_source

log = logging.getLogger(__name__)

#: called as ``hook(model, folder)`` after :func:`load_model` read a local folder and the overlay formats
#: attached theirs (none is registered by prunekit itself)
LOAD_HOOKS: list = []


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


def source_format(src: ModelSource) -> Format:
    """The format a resolved, materialized source is in (a hub id is a plain folder on the hub)."""
    return DENSE if src.hub else detect(src.path)


def load_model(spec: str, dtype: "str | torch.dtype" = "float32", device=None, trust_remote_code: bool = False,
               allow_pickle: bool = False):
    """Load ``(model, tokenizer)``; the model is in eval mode on ``device``.

    Args:
        spec: local HF folder, ``.gguf`` file, hub id (``org/name``) or alias (``smollm2-135m``);
            prunekit's low-rank, structured and compressed folders are recognised by their manifests.
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``/``None`` (best available).
        trust_remote_code: run the repository's own modelling code (off unless asked).
        allow_pickle: also accept pickled ``.bin`` weights (off: safetensors only, since
            unpickling runs arbitrary code); even then only torch's tensors-only unpickler runs.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    src = materialized(resolve_source(spec))
    fmt = source_format(src)
    if not src.hub:  # everything that can be refused is refused before a weight is read
        check_remote_code(Path(src.path), trust_remote_code)
        fmt.check(src.path, allow_pickle)
    try:
        tok = _load_tokenizer(src.path, spec, trust_remote_code)
        model = fmt.load(src.path, torch_dtype, trust_remote_code, allow_pickle)
    except OSError as e:
        where = "the Hugging Face hub (are you online? set HF_HUB_OFFLINE=0)" if src.hub else src.path
        raise FileNotFoundError(f"could not load model {spec!r} from {where}: {e}") from e
    except pickle.UnpicklingError:  # torch's weights-only unpickler met something other than tensors
        files = [] if src.hub else pickle_files(Path(src.path))
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
        for overlay in overlays():  # after the move: thresholds are put on the device of their weights
            if overlay.detect(src.path):
                overlay.attach(model, Path(src.path))
        for hook in LOAD_HOOKS:
            hook(model, Path(src.path))
    return model, _pad_with_eos(tok)


def _pad_with_eos(tok):
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def model_folder(spec: str) -> str:
    """The folder (or hub id) :func:`load_model` reads ``spec`` from; a GGUF is converted into the cache first."""
    return materialized(resolve_source(spec)).path


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer :func:`load_model` would return, without loading the weights (for a driver that
    draws calibration ids while workers load the model)."""
    src = materialized(resolve_source(spec))
    if not src.hub:
        check_remote_code(Path(src.path), trust_remote_code)
    try:
        tok = _load_tokenizer(src.path, spec, trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"could not load the tokenizer of model {spec!r} from {src.path}: {e}") from e
    return _pad_with_eos(tok)
