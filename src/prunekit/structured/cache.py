"""Block scores cached on disk by the content of the model and of the calibration ids.

Ranking blocks is independent of how many are then removed, so sweeping 10/20/30% (or re-running
with another sparsity) reuses the scores of an identical model on identical calibration tokens
instead of re-measuring (the removal perplexity costs about half a calibration forward per block).
The key hashes every tensor of the model's state dict, the token ids, the pattern kind and the
criterion with its options; a changed weight or token gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _key(model: nn.Module, ids: Tensor, tag: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tag.encode())
    h.update(ids.cpu().contiguous().numpy().tobytes())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_scores(model: nn.Module, ids: Tensor, tag: str, compute: Callable[[], dict], use: bool = True) -> dict:
    """``compute()`` (a JSON-serialisable dict), read from / written to the cache when ``use``."""
    if not use:
        return compute()
    from ..formats.sources import cache_root

    path = Path(cache_root()) / "structured" / f"{_key(model, ids, tag)}.json"
    if path.is_file():
        try:
            log.info("block scores from cache %s", path)
            return json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("ignoring unreadable cache file %s", path)
    out = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    except OSError as e:  # a read-only cache must not break pruning
        log.warning("cannot write the block-score cache %s: %s", path, e)
    return out
