"""Pure tensor functions that store a sparse weight in fewer bytes and give it back bit for bit.

Three encodings of a 2-D weight seen as ``[rows, cols]`` (``[out_features, in_features]``: N:M
groups run along the input dimension, as in :mod:`prunekit.masks`):

* ``dense``: the tensor itself.
* ``bitmask`` (unstructured): ``values`` = the non-zero entries in row-major order, in the
  weight's own dtype; ``mask`` = ``uint8[ceil(rows*cols / 8)]``, one bit per weight, row-major,
  set where the weight is non-zero.
* ``nm`` (``n`` kept in every group of ``m`` consecutive inputs): ``values`` =
  ``[rows, cols/m, n]`` kept entries in position order; ``indices`` = their positions inside the
  group, ``b = ceil(log2 m)`` bits each (2 bits for 2:4), one index after the other in the same
  order, least significant bit first. A group with fewer than ``n`` non-zeros keeps zeros too
  (its first zero positions) so every group holds exactly ``n``.

Bits are packed eight to a byte, least significant bit first (``numpy.packbits(...,
bitorder="little")``): bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``; the last byte
is zero-padded.

Zeros are compared numerically (``-0.0 == 0``), but the result is exact to the bit: when a tensor
contains any ``-0.0``, an extra ``signs`` bit string (one bit per entry *not* stored in
``values``, row-major, set for ``-0.0``) records them. Pruning in prunekit writes ``+0.0``, so
its checkpoints never need it.

:func:`encode` computes the size of every correct encoding (``nm`` with ``m`` in
:data:`NM_CANDIDATES`, ``n`` = the largest count of non-zeros in any group) and keeps the
smallest, so a dense layer stays dense and a layer is N:M only if every one of its groups is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

NM_CANDIDATES = (2, 4, 8, 16)
ENCODINGS = ("dense", "bitmask", "nm")


class CodecError(ValueError):
    """Encoded parts that cannot be the encoding of a tensor of the recorded shape."""


@dataclass
class Encoded:
    """One tensor's encoding: ``parts`` (name → tensor to store) and ``meta`` (JSON-able facts)."""

    encoding: str
    parts: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def pack_bits(bits: Tensor) -> Tensor:
    """Bool/0-1 tensor → ``uint8[ceil(numel/8)]``, row-major, least significant bit first."""
    arr = bits.reshape(-1).to(torch.bool).cpu().numpy()
    return torch.from_numpy(np.packbits(arr, bitorder="little"))


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a bool tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise CodecError(f"a bit string of {count} bits needs {(count + 7) // 8} uint8 bytes, "
                         f"got {packed.numel()} {packed.dtype}")
    arr = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(arr.astype(np.bool_, copy=False))


def index_bits(m: int) -> int:
    """Bits per in-group index for groups of ``m`` (``ceil(log2 m)``, at least 1)."""
    return max(1, (m - 1).bit_length())


def pack_indices(idx: Tensor, bits: int) -> Tensor:
    """Non-negative integers ``< 2**bits`` → a packed bit string, ``bits`` bits each, LSB first."""
    shifts = torch.arange(bits, dtype=torch.int64)
    return pack_bits((idx.reshape(-1, 1).to(torch.int64) >> shifts) & 1)


def unpack_indices(packed: Tensor, count: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_indices`: ``count`` int64 values."""
    b = unpack_bits(packed, count * bits).reshape(count, bits).to(torch.int64)
    return (b << torch.arange(bits, dtype=torch.int64)).sum(1)


def _zeros_like_signs(signs: Tensor, dtype: torch.dtype) -> Tensor:
    """``+0.0`` where ``signs`` is False, ``-0.0`` where True, in ``dtype``."""
    out = torch.zeros(signs.shape, dtype=dtype)
    return out.masked_fill_(signs, -0.0)


def encode_bitmask(w: Tensor, with_signs: bool) -> Encoded:
    """``bitmask`` encoding of a 2-D tensor (see the module docstring for the layout)."""
    zero = w == 0
    parts = {"values": w[~zero].contiguous(), "mask": pack_bits(~zero)}
    if with_signs:
        parts["signs"] = pack_bits(torch.signbit(w[zero]))
    return Encoded("bitmask", parts, {"nnz": int(parts["values"].numel())})


def decode_bitmask(parts: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    numel = math.prod(shape)
    keep = unpack_bits(parts["mask"], numel)
    values = parts["values"]
    nnz = int(keep.sum())
    if values.dim() != 1 or values.numel() != nnz or values.dtype != dtype:
        raise CodecError(f"mask has {nnz} set bits but values are {values.dtype} {tuple(values.shape)}")
    out = torch.zeros(numel, dtype=dtype)
    if "signs" in parts:
        out[~keep] = _zeros_like_signs(unpack_bits(parts["signs"], numel - nnz), dtype)
    out[keep] = values
    return out.view(shape)


def encode_nm(w: Tensor, n: int, m: int, with_signs: bool) -> Encoded:
    """``nm`` encoding; every group of ``m`` must hold at most ``n`` non-zeros (the caller checks)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // m, m)
    # non-zeros first, then the earliest zeros; stored in position order
    kept = torch.sort((g == 0).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
    kept = torch.sort(kept, dim=-1).values
    parts = {"values": g.gather(-1, kept).contiguous(), "indices": pack_indices(kept, index_bits(m))}
    if with_signs:
        dropped = torch.ones_like(g, dtype=torch.bool).scatter_(-1, kept, False)
        parts["signs"] = pack_bits(torch.signbit(g[dropped]))
    return Encoded("nm", parts, {"n": n, "m": m, "index_bits": index_bits(m)})


def decode_nm(parts: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype, n: int, m: int) -> Tensor:
    rows, cols = shape
    if not (0 < n < m) or cols % m:
        raise CodecError(f"N:M {n}:{m} does not fit a [{rows}, {cols}] weight")
    groups = cols // m
    values = parts["values"]
    if tuple(values.shape) != (rows, groups, n) or values.dtype != dtype:
        raise CodecError(f"values must be {dtype} {(rows, groups, n)}, got {values.dtype} {tuple(values.shape)}")
    idx = unpack_indices(parts["indices"], rows * groups * n, index_bits(m)).view(rows, groups, n)
    increasing = n == 1 or bool((idx[..., 1:] > idx[..., :-1]).all())
    if not increasing or bool((idx >= m).any()):
        raise CodecError(f"in-group indices are not increasing positions below {m}")
    out = torch.zeros(rows, groups, m, dtype=dtype)
    if "signs" in parts:
        dropped = torch.ones(rows, groups, m, dtype=torch.bool).scatter_(-1, idx, False)
        out[dropped] = _zeros_like_signs(unpack_bits(parts["signs"], rows * groups * (m - n)), dtype)
    out.scatter_(-1, idx, values)
    return out.view(rows, cols)


def has_negative_zero(w: Tensor) -> bool:
    return bool(((w == 0) & torch.signbit(w)).any())


def encoded_sizes(w: Tensor, candidates: tuple[int, ...] = NM_CANDIDATES,
                  signs: bool | None = None) -> list[tuple[int, str, dict]]:
    """``(bytes, encoding, params)`` of every correct encoding of the 2-D floating tensor ``w``.

    ``signs``: whether the ``signs`` bit string is needed (default: whether ``w`` holds a ``-0.0``).
    """
    rows, cols = w.shape
    numel, es = w.numel(), w.element_size()
    zero = w == 0
    nnz = numel - int(zero.sum())
    signs = has_negative_zero(w) if signs is None else signs
    out = [(numel * es, "dense", {})]
    for m in candidates:
        if m > cols or cols % m:
            continue
        n = max(1, int((~zero).reshape(rows, cols // m, m).sum(-1).max()))
        if n >= m:
            continue
        kept = rows * (cols // m) * n
        size = kept * es + (kept * index_bits(m) + 7) // 8 + (signs * (numel - kept) + 7) // 8
        out.append((size, "nm", {"n": n, "m": m}))
    out.append((nnz * es + (numel + 7) // 8 + (signs * (numel - nnz) + 7) // 8, "bitmask", {}))
    return out


def encode(w: Tensor, sparse_ok: bool = True, candidates: tuple[int, ...] = NM_CANDIDATES) -> Encoded:
    """The smallest correct encoding of ``w`` (ties: dense, then ``nm`` with the smaller ``m``, then bitmask).

    2:4 costs the same either way (2 two-bit indices or 4 mask bits per group of 4), and is then
    stored as ``nm`` (the 2-bit positions are what sparse 2:4 kernels keep as metadata); for 4:8 the 3-bit indices cost 1.5 bits per
    weight against the mask's 1, so a 4:8 layer is stored as ``bitmask``.

    Only 2-D floating-point tensors with ``sparse_ok`` are candidates for ``bitmask``/``nm``;
    everything else is stored ``dense``. ``w`` is read on the CPU; a ``dense`` part may share its
    storage (it is only written out, never modified).
    """
    w = w.detach().cpu().contiguous()
    if not sparse_ok or w.dim() != 2 or not w.is_floating_point() or w.numel() == 0:
        return Encoded("dense", {"data": w})
    signs = has_negative_zero(w)
    size, kind, params = min(encoded_sizes(w, candidates, signs), key=lambda o: o[0])
    if kind == "dense":
        return Encoded("dense", {"data": w})
    enc = encode_bitmask(w, signs) if kind == "bitmask" else encode_nm(w, params["n"], params["m"], signs)
    if enc.nbytes != size:  # the size model and the layout must agree, or the choice was not the smallest
        raise RuntimeError(f"{kind} encoding took {enc.nbytes} bytes, its size model said {size}")
    return enc


def decode(encoding: str, parts: dict[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype,
           meta: dict[str, Any] | None = None) -> Tensor:
    """The tensor :func:`encode` was given, bit for bit (raises :class:`CodecError` on bad parts)."""
    meta = meta or {}
    if encoding == "dense":
        data = parts["data"]
        if tuple(data.shape) != tuple(shape) or data.dtype != dtype:
            raise CodecError(f"tensor is {data.dtype} {tuple(data.shape)}, expected {dtype} {tuple(shape)}")
        return data
    if len(shape) != 2:
        raise CodecError(f"{encoding} encoding needs a 2-D shape, got {tuple(shape)}")
    if encoding == "bitmask":
        return decode_bitmask(parts, (shape[0], shape[1]), dtype)
    if encoding == "nm":
        return decode_nm(parts, (shape[0], shape[1]), dtype, int(meta["n"]), int(meta["m"]))
    raise CodecError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
