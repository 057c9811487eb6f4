"""Activation-sparsity thresholds beside the weights: ``activation_sparsity.json`` + ``.safetensors``.

An *overlay* format: the weights stay in whatever format they are (a plain Hugging Face folder by
default, or compressed, low rank, structured), so a plain ``from_pretrained`` loads the *dense* model
and ignores the side files; the JSON says so in its ``note``. :func:`prunekit.load_model` asks every
overlay format whether a folder holds its files once the weights are loaded, and this one installs
the thresholds (:meth:`ActivationFormat.attach`); ``prunekit generate`` / ``bench`` then run them
with the sparse kernels.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..models.activation import ActivationState, Site, state_of
from .atomic import atomic_folder
from .base import FORMATS, Format, detect
from .save import save_folder
from .sizes import model_bytes

log = logging.getLogger(__name__)

MANIFEST = "activation_sparsity.json"
TENSORS = "activation_sparsity.safetensors"
FORMAT = "prunekit-activation-sparsity"
VERSION = 1
NOTE = ("Activation-sparsity thresholds (prunekit). transformers' from_pretrained loads this folder's weights as "
        "the DENSE model and ignores these thresholds; prunekit.load_model applies them (the masked model), and "
        "`prunekit generate` / `prunekit bench` run them with the sparse CPU kernels.")


def has_saved(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def write_side_files(state: ActivationState, folder: str | os.PathLike) -> None:
    """Write the manifest and the threshold tensors into ``folder`` (an atomic save's temporary folder)."""
    folder = Path(folder)
    tensors = {name: t.float().contiguous().reshape(-1) if t.dim() else t.float().reshape(1)
               for name, t in state.thresholds.items()}
    save_file(tensors, str(folder / TENSORS))
    manifest = {"format": FORMAT, "version": VERSION, "note": NOTE, "method": state.method, "config": state.config,
                "sites": [{"name": s.name, "kind": s.kind, "width": s.width, "skipped_params": s.skipped_params,
                           "channelwise": s.channelwise} for s in state.sites.values()],
                "report": state.report}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def read_side_files(folder: str | os.PathLike) -> ActivationState:
    """The :class:`ActivationState` saved in ``folder`` (not yet installed)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError) as e:
        raise ConfigError(f"the activation thresholds in {str(folder)!r} cannot be read ({e}); save the model again, "
                          f"or delete {MANIFEST} and {TENSORS} to load it dense") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConfigError(f"{folder / MANIFEST} is not a prunekit activation-sparsity manifest of version {VERSION}")
    sites, thresholds = {}, {}
    for rec in manifest["sites"]:
        site = Site(rec["name"], rec["kind"], rec["width"], rec["skipped_params"], rec.get("channelwise", False))
        t = tensors.get(site.name)
        if t is None or (t.numel() != (site.width if site.channelwise else 1)):
            raise ConfigError(f"{folder / TENSORS} lacks a threshold of the right size for {site.name}; save the "
                              "model again")
        sites[site.name] = site
        thresholds[site.name] = t if site.channelwise else t.reshape(())
    return ActivationState(manifest["method"], manifest.get("config", {}), sites, thresholds, manifest.get("report", {}))


def attach_saved(model: nn.Module, folder: str | os.PathLike) -> ActivationState | None:
    """Install the thresholds saved in ``folder`` on ``model`` (``None`` if there are none)."""
    if not has_saved(folder):
        return None
    state = read_side_files(folder)
    missing = [n for n in state.sites if not _has_module(model, n)]
    if missing:
        raise ConfigError(f"activation thresholds in {str(folder)!r} name {missing[0]}, which this model lacks; the "
                          "side files belong to another model")
    state.install(model)
    log.info("installed %d activation thresholds (%s) from %s", len(state.sites), state.method, folder)
    return state


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def save_with_thresholds(model: nn.Module, tokenizer, out_dir, report: dict | None = None, overwrite: bool = False,
                         merge_lowrank: bool = False, save_format: str = "dense") -> tuple[Path, str]:
    """:func:`~prunekit.formats.save_folder` plus the threshold side files, in one atomic folder
    (the plain :func:`~prunekit.formats.save_folder` when ``model`` carries no thresholds).

    The weights are written by the format's own writer into a subfolder of the atomic temporary
    folder, moved up beside the side files, and the whole folder is swapped in at once.
    """
    state = state_of(model)
    if state is None:
        return save_folder(model, tokenizer, out_dir, report, overwrite, merge_lowrank, save_format)
    how: list[str] = []

    def write(tmp: Path) -> None:
        inner, sentence = save_folder(model, tokenizer, tmp / "weights", report, False, merge_lowrank, save_format)
        for f in inner.iterdir():
            os.replace(f, tmp / f.name)
        inner.rmdir()
        write_side_files(state, tmp)
        how.append(sentence)

    out = atomic_folder(out_dir, write, overwrite, needed_bytes=model_bytes(model))
    return out, (f"{how[0]}; activation thresholds ({state.method}) in {MANIFEST} / {TENSORS}: prunekit.load_model "
                 "applies them, a plain from_pretrained loads the dense model")


class ActivationFormat(Format):
    """The threshold side files, an overlay on whichever format holds the weights."""

    name = "activation"
    order = 0
    overlay = True
    loader = "prunekit.load_model (a plain from_pretrained loads the dense model)"

    def detect(self, path: str | os.PathLike) -> bool:
        return has_saved(path)

    def save(self, model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
             overwrite: bool = False) -> tuple[Path, str]:
        """The weights in the format :func:`~prunekit.formats.choose` gives, and the thresholds beside them."""
        if state_of(model) is None:
            raise ConfigError("this model carries no activation thresholds to save: calibrate them first "
                              "(prunekit.compress(model, ActivationSparsityConfig(...)), or prune --activation-sparsity)")
        return save_with_thresholds(model, tokenizer, out_dir, report, overwrite)

    def check(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        detect(path).check(path, allow_pickle)

    def load(self, path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> nn.Module:
        """The weights read by their own format, the thresholds installed (on the CPU)."""
        model = detect(path).load(path, dtype, trust_remote_code, allow_pickle)
        self.attach(model, path)
        return model

    def attach(self, model: nn.Module, path: str | os.PathLike) -> None:
        attach_saved(model, path)


ACTIVATION = FORMATS.add("activation", ActivationFormat(),
                         help="activation-sparsity thresholds beside the weights of any other format (an overlay)")
