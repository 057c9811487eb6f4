"""A uniform view of "a linear layer" across nn.Linear and GPT-2's transposed Conv1D.

Everything outside ``models/`` sees weights as ``[out_features, in_features]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x @ W + b with W stored [in, out]
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_view(module: nn.Module) -> Tensor:
    """The weight as ``[out, in]``; a view, so in-place edits reach the module."""
    w = module.weight.data
    return w.t() if is_conv1d(module) else w


def set_weight(module: nn.Module, new: Tensor) -> None:
    """Write an ``[out, in]`` matrix back in the module's own layout and dtype."""
    w = module.weight.data
    w.copy_(new.t() if is_conv1d(module) else new)


def in_features(module: nn.Module) -> int:
    return weight_view(module).shape[1]


def out_features(module: nn.Module) -> int:
    return weight_view(module).shape[0]


def weight_fp32(module: nn.Module) -> Tensor:
    """A float32 copy of the ``[out, in]`` weight (never aliases the module's storage)."""
    return weight_view(module).to(torch.float32, copy=True)

#: the old private name, for code written before it was public
_is_conv1d = is_conv1d
