"""State dicts as the single-file prunekit formats store them."""

from __future__ import annotations

from torch import nn


def dedup_state(model: nn.Module) -> dict:
    """State dict without storage-sharing duplicates (tied embeddings), contiguous for safetensors."""
    seen, out = set(), {}
    for k, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.data_ptr() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous()
    return out
