"""Compile the C++ kernels at first use and cache them; report why when they cannot be used.

``torch.utils.cpp_extension.load`` compiles ``csrc/*.cpp`` with the ``g++`` on the
machine (``-O3 -march=native -fopenmp``: the compiler vectorises for this CPU, and the AVX-512
paths are picked at run time) into ``$PRUNEKIT_CACHE/kernels/<key>/``; the key hashes the sources,
the flags, the torch version and the CPU's model and flags, so a cache shared between machines
never hands one CPU another's binary. ``PRUNEKIT_KERNELS=off`` (or a failed compile) makes every
op use its pure-PyTorch fallback (:mod:`.ops`), which computes the same values, slower.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "sparse_gemv.cpp", CSRC / "bitmask.cpp"]  # the first holds the Python bindings
HEADERS = [CSRC / "common.h"]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-mprefer-vector-width=512", "-Wno-unused-function"]
LDFLAGS = ["-fopenmp"]

_EXT = None  # the loaded module: loaded once per process (loading the same name again recompiles)
_FAILED: str | None = None


def _disabled() -> str | None:
    if os.environ.get("PRUNEKIT_KERNELS", "").lower() in ("off", "0", "no", "false", "torch"):
        return "PRUNEKIT_KERNELS=off"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the C++ kernels are built for x86-64 only (this is {platform.machine()})"
    return None


def _cpu_identity() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def cache_key() -> str:
    h = hashlib.sha256()
    parts = [f.read_bytes() for f in SOURCES + HEADERS]
    for part in (*parts, " ".join(CFLAGS).encode(), torch.__version__.encode(), _cpu_identity().encode()):
        h.update(part)
    return h.hexdigest()[:16]


def _build_dir() -> Path:
    from ..formats.sources import cache_root

    return cache_root() / "kernels" / cache_key()


def extension():
    """The compiled extension module, or ``None`` (then :func:`why_unavailable` says why).

    ``PRUNEKIT_KERNELS=off`` is read on every call, so it can be switched within a process.
    """
    global _EXT, _FAILED
    if _disabled() is not None or _FAILED is not None:
        return None
    if _EXT is not None:
        return _EXT
    try:
        from torch.utils.cpp_extension import load

        build = _build_dir()
        build.mkdir(parents=True, exist_ok=True)
        log.info("loading the sparse kernels from %s (compiled there on first use, ~1 min)", build)
        _EXT = load(name=f"prunekit_sparse_{cache_key()}", sources=[str(f) for f in SOURCES], extra_cflags=CFLAGS,
                    extra_ldflags=LDFLAGS, build_directory=str(build), verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers, a compile error: fall back, say why
        _FAILED = f"the C++ kernels could not be built ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
        log.warning("%s; using the pure-PyTorch fallback (same values, slower)", _FAILED)
        return None
    return _EXT


def available() -> bool:
    return extension() is not None


def why_unavailable() -> str | None:
    return None if extension() is not None else (_disabled() or _FAILED)


def reset() -> None:
    """Forget a failed build (a loaded module stays loaded: loading it again would recompile it)."""
    global _FAILED
    _FAILED = None
