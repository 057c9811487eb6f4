"""Where a locally built llama.cpp lives, and running it on prunekit's own token ids.

prunekit never ships llama.cpp. ``python benchmarks/llamacpp.py build`` downloads the
``llama-cpp-python`` source distribution (:data:`VERSION`) from PyPI, builds the llama.cpp it
vendors (``llama-quantize``, ``llama-perplexity``, ``llama-bench``, ``llama-completion``) plus
prunekit's small logits dumper (``benchmarks/llamacpp_logits.cpp``), and caches the binaries under
``$PRUNEKIT_CACHE/llama.cpp-<VERSION>/bin``. Everything that needs a binary asks :func:`binary`,
which fails with one line naming that command when the build is absent.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: the llama-cpp-python release whose vendored llama.cpp is built and checked against
VERSION = "0.3.36"
BUILD_COMMAND = "python benchmarks/llamacpp.py build"
#: the binaries a build provides (``prunekit-logits`` is ours, the rest are llama.cpp's)
BINARIES = ("llama-quantize", "llama-perplexity", "llama-bench", "llama-completion", "prunekit-logits")


def cache_dir() -> Path:
    """``$PRUNEKIT_CACHE/llama.cpp-<VERSION>`` (default cache ``~/.cache/prunekit``)."""
    root = Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))
    return root / f"llama.cpp-{VERSION}"


def bin_dir() -> Path:
    return cache_dir() / "bin"


def available(name: str = "prunekit-logits") -> bool:
    """True when the cached build has binary ``name`` (tests skip on False)."""
    p = bin_dir() / name
    return p.is_file() and os.access(p, os.X_OK)


def binary(name: str) -> Path:
    """Path of llama.cpp binary ``name``.

    Raises:
        ConfigError: the build is absent, naming the command that makes it.
    """
    if name not in BINARIES:
        raise ValueError(f"unknown llama.cpp binary {name!r}; known: {', '.join(BINARIES)}")
    if not available(name):
        raise ConfigError(f"llama.cpp's {name} is not built (looked in {bin_dir()}): run `{BUILD_COMMAND}` once "
                          f"(downloads llama-cpp-python {VERSION}'s source from PyPI and builds it with cmake + g++)")
    return bin_dir() / name


def logits(gguf: str | os.PathLike, ids, threads: int = 2, kv: str = "f32", timeout: float = 1800) -> np.ndarray:
    """llama.cpp's float32 logits ``[n_tokens, n_vocab]`` of model ``gguf`` on token ids ``ids`` (one sequence).

    The ids are passed as they are (no tokenization inside llama.cpp), positions ``0..n-1``, one
    batch; ``kv="f32"`` keeps the KV cache in float32 so only the weights' format is compared.
    """
    ids = np.asarray(ids, dtype="<i4").reshape(-1)
    with tempfile.TemporaryDirectory(prefix="prunekit-logits-") as tmp:
        tok, out = Path(tmp) / "ids.i32", Path(tmp) / "logits.f32"
        ids.tofile(tok)
        proc = subprocess.run([str(binary("prunekit-logits")), str(gguf), str(tok), str(out), str(threads), kv],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"prunekit-logits failed on {gguf}: {proc.stderr.strip()[-2000:]}")
        n_vocab = int(proc.stdout.split()[-1])
        return np.fromfile(out, dtype="<f4").reshape(len(ids), n_vocab)
