"""The factorized linear layer low-rank methods produce, and loading folders that contain it.

A :class:`LowRankLinear` computes ``y = B (A x) + b`` with ``A = sqrt(S_k) V_k^T`` (``[k, in]``)
and ``B = U_k sqrt(S_k)`` (``[out, k]``): two ordinary matmuls whose parameter count
``k (in + out)`` is below the dense ``in * out`` exactly when ``k < in*out / (in + out)``.

Saved prunekit low-rank folders (see :mod:`prunekit.export.lowrank`) hold ``config.json``, the
tokenizer, a manifest :data:`MANIFEST` naming every factorized module and its rank, and the
state dict in :data:`WEIGHTS` (not ``model.safetensors``, so plain transformers refuses the
folder loudly instead of silently re-initialising the missing dense weights). The manifest's
``integrity`` entry (:mod:`prunekit.formats.checksum`) holds the CRC-32 of every tensor and of
the manifest; the loader checks them while it reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from .blocks import set_module
from ..errors import ConfigError
from ..formats import checksum

log = logging.getLogger(__name__)

MANIFEST = "prunekit_lowrank.json"
WEIGHTS = "prunekit_lowrank.safetensors"
FORMAT = "prunekit-lowrank"


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-``k`` replacement of an ``[out, in]`` linear layer.

    ``down.weight`` is ``A = sqrt(S_k) V_k^T`` and ``up.weight`` is ``B = U_k sqrt(S_k)``; the
    bias (if any) lives on ``up``. Splitting ``sqrt(S)`` evenly keeps both factors on the same
    scale, which matters in bf16/fp16.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not (1 <= rank <= min(in_features, out_features)):
            raise ConfigError(f"rank {rank} must lie in [1, min(in, out) = {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, a: Tensor, b: Tensor, bias: Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "LowRankLinear":
        """Build from ``A`` (``[k, in]``) and ``B`` (``[out, k]``), cast to ``dtype`` (default ``a``'s)."""
        k, n = a.shape
        m, k2 = b.shape
        if k != k2:
            raise ConfigError(f"factor shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
        dtype = dtype or a.dtype
        mod = cls(n, m, k, bias is not None, dtype=dtype, device=a.device)
        with torch.no_grad():
            mod.down.weight.copy_(a)
            mod.up.weight.copy_(b)
            if bias is not None:
                mod.up.bias.copy_(bias)
        return mod

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def nonzero_params(self) -> int:
        """Stored weights (bias excluded, as for the dense layer's sparsity)."""
        return self.rank * (self.in_features + self.out_features)

    def merged_weight(self) -> Tensor:
        """The dense ``[out, in]`` product ``B A`` (computed in float32, returned in the module dtype)."""
        w = self.up.weight.detach().float() @ self.down.weight.detach().float()
        return w.to(self.up.weight.dtype)

    def to_linear(self) -> nn.Linear:
        """An ordinary ``nn.Linear`` holding the merged weight (for plain-transformers export)."""
        w = self.up.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(self.merged_weight())
            if self.up.bias is not None:
                lin.bias.copy_(self.up.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    """Qualified name → every :class:`LowRankLinear` inside ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def merge_lowrank(model: nn.Module) -> int:
    """Replace every :class:`LowRankLinear` by a dense ``nn.Linear`` (in place); returns how many."""
    mods = lowrank_modules(model)
    for name, mod in mods.items():
        set_module(model, name, mod.to_linear())
    return len(mods)


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
    index = path / "prunekit_lowrank.safetensors.index.json"
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
    """Rebuild a model saved by :func:`prunekit.export.lowrank.save_lowrank`.

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
