"""What every on-disk format is: a :class:`Format` that detects, saves and loads its folders, and the
:data:`FORMATS` registry that :func:`prunekit.formats.load.load_model` asks, in :attr:`Format.order`,
which format a folder is in.

A format module defines one subclass and registers one instance::

    FORMATS.add("lowrank", LowRankFormat(), help="...")

An *overlay* format keeps something beside the weights of any other format (the activation
thresholds): :func:`detect` never answers it, and ``load_model`` asks every overlay, once the
weights are loaded and on their device, to :meth:`Format.attach` what it finds.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class Format(ABC):
    """One on-disk format.

    Attributes:
        name: the registry name (``dense``, ``compressed``, ``lowrank``, ``structured``, ``gguf``).
        order: detection order: formats with a manifest come before the plain folder, which
            recognises any Hugging Face folder and is asked last.
        loader: one phrase saying what reads a saved folder back.
        overlay: the format sits beside another format's weights (it is asked by :func:`overlays`,
            never by :func:`detect`).
    """

    name: str = ""
    order: int = 50
    loader: str = "prunekit.load_model"
    overlay: bool = False

    @abstractmethod
    def detect(self, path: str | os.PathLike) -> bool:
        """True if ``path`` holds a model in this format (cheap: reads no weights)."""

    @abstractmethod
    def save(self, model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: dict | None = None,
             overwrite: bool = False) -> tuple[Path, str]:
        """Save atomically; returns the folder (or file) and one sentence saying what loads it."""

    @abstractmethod
    def load(self, path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> nn.Module:
        """The model saved at ``path``, in eval mode on the CPU."""

    def check(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        """Refuse, before any weight is read, what cannot be loaded safely (default: the weight files)."""
        check_weight_files(Path(path), allow_pickle)

    def attach(self, model: nn.Module, path: str | os.PathLike) -> None:
        """An overlay: install on the loaded ``model`` what it keeps in ``path`` (weight formats: nothing)."""


#: every on-disk format, by name (each format module registers its own)
FORMATS: Registry[Format] = Registry("format")


def detection_order() -> list[Format]:
    """The registered weight formats in the order :func:`detect` asks them (overlays are not among them)."""
    return sorted((f for f in map(FORMATS.get, FORMATS.names()) if not f.overlay), key=lambda f: f.order)


def overlays() -> list[Format]:
    """The registered overlay formats, in their order (``load_model`` asks each after the weights load)."""
    return sorted((f for f in map(FORMATS.get, FORMATS.names()) if f.overlay), key=lambda f: f.order)


def detect(path: str | os.PathLike) -> Format:
    """The format of the folder (or file) ``path``: the first registered format that recognises it."""
    for fmt in detection_order():
        if fmt.detect(path):
            return fmt
    names = ", ".join(f.name for f in detection_order())
    raise FileNotFoundError(f"{str(path)!r} is in no format prunekit reads ({names}): pass a "
                            "Hugging Face model folder (as written by save_pretrained), a prunekit folder or a .gguf file")


def pickle_files(folder: Path) -> list[str]:
    """The pickled weight files in ``folder`` (unpickling can run code)."""
    return sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)


def check_weight_files(folder: Path, allow_pickle: bool = False) -> None:
    """Fail before loading, naming the file: pickle-only weights without ``allow_pickle``, or a
    damaged (e.g. truncated) safetensors file — its header and size are checked, which is cheap."""
    from safetensors import safe_open

    st = sorted(folder.glob("*.safetensors"))
    pickles = pickle_files(folder)
    if not st and pickles and not allow_pickle:
        raise ConfigError(f"model folder {str(folder)!r} has only pickled weights ({pickles[0]}); prunekit loads "
                          "safetensors unless you pass --allow-pickle (unpickling can run code: only for files you trust)")
    for f in st:
        try:
            with safe_open(str(f), framework="pt"):
                pass  # opening checks the header and that it covers the whole file
        except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
            raise ConfigError(f"{f} is damaged ({e}); re-download the model or save it again") from None
        if f.stat().st_size == 0:
            raise ConfigError(f"{f} is empty; re-download the model or save it again")
