"""prunekit's factorized low-rank folder: models with :class:`~prunekit.models.lowrank.LowRankLinear` modules.

A folder holds ``config.json``, the tokenizer, the manifest :data:`MANIFEST` (which modules are low
rank, their shapes and ranks) and the state dict in :data:`WEIGHTS` with the factor tensors
``<name>.down.weight`` / ``<name>.up.weight`` (or shards and :data:`SHARD_INDEX` when written
block by block while streaming). It keeps the memory saving on disk and in RAM, and reloads with
``prunekit.load_model(folder)``, which rebuilds the factorized modules. Plain ``transformers``
cannot load it — on purpose: it finds no ``model.safetensors`` and fails loudly instead of
re-initialising the missing dense weights. The manifest's ``integrity`` entry
(:mod:`prunekit.formats.checksum`) holds the CRC-32 of every tensor and of the manifest; the loader
checks them while it reads.

For plain transformers, :func:`prunekit.formats.dense.save_merged` multiplies every factor pair back
into a dense ``nn.Linear`` (``W' = B A``): it loads anywhere with the same outputs, but is exactly as
large as the dense model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..models.blocks import set_module
from ..models.lowrank import LowRankLinear, lowrank_modules
from ..models.runtime import clear_quantizer
from . import checksum
from .atomic import atomic_folder
from .base import FORMATS, Format
from .sizes import dense_weights_bytes, model_bytes, write_report
from .state import dedup_state

log = logging.getLogger(__name__)

MANIFEST = "prunekit_lowrank.json"
WEIGHTS = "prunekit_lowrank.safetensors"
#: the stem of the shards a streamed save writes (``STEM-00001-of-00004.safetensors``) and of their index
STEM = "prunekit_lowrank"
SHARD_INDEX = f"{STEM}.safetensors.index.json"
FORMAT = "prunekit-lowrank"
HOW = ("factorized low-rank format: reload with prunekit.load_model (or `prunekit export --merge-lowrank` "
       "for plain transformers)")


def manifest(model: nn.Module) -> dict[str, Any]:
    """What :func:`load_lowrank_model` needs to rebuild the modules."""
    mods = lowrank_modules(model)
    return {
        "format": FORMAT,
        "version": 1,
        "modules": {n: {"rank": m.rank, "in_features": m.in_features, "out_features": m.out_features,
                        "bias": m.up.bias is not None} for n, m in mods.items()},
        "params_factorized": sum(m.nonzero_params() for m in mods.values()),
        "params_dense_equivalent": sum(m.in_features * m.out_features for m in mods.values()),
    }


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
        state = dedup_state(model)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(checksum.seal(info, checksum.checksums(state)), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_report(tmp, report, dense, "lowrank")

    out = atomic_folder(out_dir, write, overwrite, needed_bytes=model_bytes(model))
    log.info("saved %d low-rank modules to %s", len(info["modules"]), out)
    return out


def is_lowrank_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    f = Path(path) / MANIFEST
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise checksum.IntegrityError(f"{f}: unreadable manifest ({e}); save the folder again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("modules"), dict):
        raise ConfigError(f"{f} is not a prunekit low-rank manifest (format {data.get('format')!r}); "
                         "was the folder written by another tool?")
    return data


def _read_weights(path: Path, sums: dict[str, str] | None) -> dict:
    """The state dict of a low-rank folder: one file, or shards written block by block (streamed);
    every tensor checked against its recorded checksum as it is read (``sums=None``: an old folder)."""
    index = path / SHARD_INDEX
    if (path / WEIGHTS).is_file():
        return checksum.read_verified(path / WEIGHTS, sums)
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(checksum.read_verified(path / shard, sums))
        return state
    raise ConfigError(f"low-rank folder {str(path)!r} has a manifest but no {WEIGHTS} (nor shards with an index); "
                      "the save was incomplete: save it again")


def load_lowrank_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save_lowrank`.

    The architecture comes from ``config.json``; every module named in the manifest becomes a
    :class:`LowRankLinear` of the recorded rank before the state dict is loaded (strictly: a
    missing or unexpected tensor is an error, except tied weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    manifest = read_manifest(path)
    sums = checksum.verify_manifest(manifest, path / MANIFEST)  # before anything is built from it
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, spec in manifest["modules"].items():
        set_module(model, name, LowRankLinear(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]),
                                              bool(spec.get("bias", False)), dtype=dtype))
    state = _read_weights(path, sums)
    missing, unexpected = model.load_state_dict(state, strict=False)
    ptrs = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    params = model.state_dict()
    real_missing = [k for k in missing if params[k].data_ptr() not in ptrs]  # tied weights share storage
    if unexpected or real_missing:
        raise ConfigError(f"low-rank folder {str(path)!r} does not match its manifest: missing {real_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")
    log.info("loaded %d low-rank modules from %s", len(manifest["modules"]), path)
    return model.eval()


class LowRankFormat(Format):
    """The factorized low-rank folder (recognised by its manifest)."""

    name = "lowrank"
    order = 20

    def detect(self, path: str | os.PathLike) -> bool:
        return is_lowrank_folder(path)

    def save(self, model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
             overwrite: bool = False) -> tuple[Path, str]:
        return save_lowrank(model, tokenizer, out_dir, report, overwrite), HOW

    def load(self, path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> nn.Module:
        return load_lowrank_model(path, dtype, trust_remote_code)


LOWRANK = FORMATS.add("lowrank", LowRankFormat(), help="prunekit's factorized low-rank folder (prunekit.load_model)")
