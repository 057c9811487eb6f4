"""Saving models that contain :class:`~prunekit.models.lowrank.LowRankLinear` modules.

Two formats, chosen by the caller:

* **factorized** (:func:`save_lowrank`): ``config.json`` + tokenizer + ``prunekit_lowrank.json``
  (which modules are low rank, their shapes and ranks) + ``prunekit_lowrank.safetensors`` (the
  state dict with the factor tensors ``<name>.down.weight`` / ``<name>.up.weight``). It keeps
  the memory saving on disk and in RAM, and reloads with ``prunekit.load_model(folder)`` (which
  rebuilds the factorized modules). Plain ``transformers`` cannot load it — on purpose it finds
  no ``model.safetensors`` and fails loudly instead of re-initialising the missing weights.
* **merged** (:func:`save_merged`): every factor pair is multiplied back into a dense
  ``nn.Linear`` (``W' = B A``) and the model is saved with ``save_pretrained``; it loads anywhere
  (``AutoModelForCausalLM.from_pretrained``, vLLM, llama.cpp converters) with the same outputs,
  but is exactly as large as the dense model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..formats import checksum
from ..models import clear_quantizer
from ..models.lowrank import FORMAT, MANIFEST, WEIGHTS, lowrank_modules, merge_lowrank
from .atomic import atomic_folder
from .save import dense_weights_bytes, model_bytes, save_model, write_report

log = logging.getLogger(__name__)


def manifest(model: nn.Module) -> dict[str, Any]:
    """What :func:`prunekit.models.lowrank.load_lowrank_model` needs to rebuild the modules."""
    mods = lowrank_modules(model)
    return {
        "format": FORMAT,
        "version": 1,
        "modules": {n: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
                        "bias": m.up.bias is not None} for n, m in mods.items()},
        "params_factorized": sum(m.nonzero_params() for m in mods.values()),
        "params_dense_equivalent": sum(m.in_features * m.out_features for m in mods.values()),
    }


def _unique_state(model: nn.Module) -> dict:
    """State dict without storage-sharing duplicates (tied embeddings), contiguous for safetensors."""
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.data_ptr() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous()
    return out


def save_lowrank(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Save the factorized model atomically (reload with ``prunekit.load_model(out_dir)``)."""
    from safetensors.torch import save_file

    clear_quantizer(model)
    info = manifest(model)
    dense = dense_weights_bytes(model)

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        state = _unique_state(model)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(checksum.seal(info, checksum.checksums(state)), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report, dense, "lowrank")

    out = atomic_folder(out_dir, write, overwrite, needed_bytes=model_bytes(model))
    log.info("saved %d low-rank modules to %s", len(info["modules"]), out)
    return out


def save_merged(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                overwrite: bool = False) -> Path:
    """Merge every factor pair into a dense linear (the model is modified) and save plain safetensors."""
    n = merge_lowrank(model)
    log.info("merged %d low-rank modules into dense weights", n)
    return save_model(model, tokenizer, out_dir, report, overwrite)


def save_compressed(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
                    overwrite: bool = False, merge: bool = False) -> tuple[Path, str]:
    """Save in the right format; returns the folder and a sentence saying what loads it."""
    from .structured import is_restructured, save_structured

    if not lowrank_modules(model) and is_restructured(model):  # structurally pruned: smaller shapes
        return save_structured(model, tokenizer, out_dir, report, overwrite)
    if lowrank_modules(model) and not merge:
        return save_lowrank(model, tokenizer, out_dir, report, overwrite), (
            "factorized low-rank format: reload with prunekit.load_model (or `prunekit export --merge-lowrank` "
            "for plain transformers)")
    merged = bool(lowrank_modules(model))
    out = save_merged(model, tokenizer, out_dir, report, overwrite) if merged else save_model(
        model, tokenizer, out_dir, report, overwrite)
    return out, ("plain safetensors" + (" (low-rank factors merged: no size saving)" if merged else "")
                 + ": reload with transformers.AutoModelForCausalLM.from_pretrained")
