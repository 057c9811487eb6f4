"""The activation thresholds beside the weights: ``activation_sparsity.json`` + ``.safetensors``.

The weights folder stays whatever format it is (a plain Hugging Face folder by default), so a
plain ``from_pretrained`` loads the *dense* model and ignores the side files; the JSON says so
in its ``note``. :func:`prunekit.load_model` finds the side files and installs the thresholds
(:func:`attach_saved`, registered as a load hook), and ``prunekit generate`` / ``bench`` run
them with the sparse kernels.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError
from ..models.activation import ActivationState, Site

log = logging.getLogger(__name__)

MANIFEST = "activation_sparsity.json"
TENSORS = "activation_sparsity.safetensors"
FORMAT = "prunekit-activation-sparsity"
VERSION = 1
NOTE = ("Activation-sparsity thresholds (prunekit). transformers' from_pretrained loads this folder's weights as "
        "the DENSE model and ignores these thresholds; prunekit.load_model applies them (the masked model), and "
        "`prunekit generate` / `prunekit bench` run them with the sparse CPU kernels.")


def has_saved(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def write_side_files(state: ActivationState, folder: str | Path) -> None:
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


def read_side_files(folder: str | Path) -> ActivationState:
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


def attach_saved(model: nn.Module, folder: str | Path) -> ActivationState | None:
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
    """:func:`prunekit.formats.save_folder` plus the threshold side files, in one atomic folder.

    The weights are written by the format's own writer into a subfolder of the atomic temporary
    folder, moved up beside the side files, and the whole folder is swapped in at once.
    """
    import os

    from ..formats import atomic_folder, save_folder
    from ..models.activation import state_of

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

    from ..formats import model_bytes

    out = atomic_folder(out_dir, write, overwrite, needed_bytes=model_bytes(model))
    return out, (f"{how[0]}; activation thresholds ({state.method}) in {MANIFEST} / {TENSORS}: prunekit.load_model "
                 "applies them, a plain from_pretrained loads the dense model")
