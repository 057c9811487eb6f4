"""How many bytes a save will write, estimated before the work, so a full disk is found up front.

The estimate follows the output format:

* ``dense`` (a plain folder, or the low-rank format, which is never larger): every tensor at full
  size, tied ones once;
* ``compressed``: each pruned linear at ``(1 - s)`` of its values plus one mask bit per weight (the
  bitmask bound; N:M is smaller), never more than dense; everything else dense;
* structured patterns: the pruned linears at ``(1 - s)`` of their size (whole units go), the rest
  dense.

:func:`prunekit.formats.atomic.check_free_space` adds a margin proportional to the size (and the
tokenizer files), and the save itself checks again against the exact size before it writes.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..models.linear import weight_view
from ..errors import ConfigError
from .atomic import check_free_space
from .load import model_folder
from .sizes import model_bytes


def estimate_output_bytes(model: nn.Module, save_format: str = "dense", sparsity: float = 0.0,
                          structured: bool = False, linears: dict[str, nn.Module] | None = None) -> int:
    """Bytes of weights a save of ``model`` after pruning ``linears`` to ``sparsity`` will write."""
    total = model_bytes(model)
    if not linears or not (structured or save_format == "compressed"):
        return total
    keep = 1.0 - float(sparsity)
    for mod in linears.values():
        w = weight_view(mod)
        dense = w.numel() * w.element_size()
        pruned = keep * dense if structured else keep * dense + w.numel() / 8
        total -= dense - min(dense, int(pruned))
    return total


def tokenizer_bytes(folder: str | None) -> int:
    """Bytes of the tokenizer files in a model folder (written beside the weights); 0 when unknown."""
    if not folder or not Path(folder).is_dir():
        return 0
    names = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "*.model")
    return sum(f.stat().st_size for pat in names for f in Path(folder).glob(pat) if f.is_file())


def check_save_space(out, model: nn.Module, spec: str | None, save_format: str = "dense", sparsity: float = 0.0,
                     structured: bool = False, linears: dict[str, nn.Module] | None = None) -> None:
    """Before the work: fail in one line if the disk under ``out`` cannot hold what the save will write
    (``spec``: what the model was loaded from, for its tokenizer files; ``None``: not known)."""
    try:
        folder = model_folder(spec) if spec else None
    except (OSError, ConfigError):
        folder = None
    check_free_space(out, estimate_output_bytes(model, save_format, sparsity, structured, linears),
                     tokenizer_bytes(folder))
