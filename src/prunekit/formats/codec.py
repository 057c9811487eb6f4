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

Everything works on the weights' bit patterns (as signed integers), so a round trip is exact to
the bit. A zero is an entry whose bits other than the sign bit are all clear (``+0.0`` and
``-0.0``, what ``w == 0`` finds); when a tensor holds any ``-0.0``, an extra ``signs`` bit string
(one bit per entry *not* stored in ``values``, row-major, set for ``-0.0``) records them.
Pruning in prunekit writes ``+0.0``, so its checkpoints never need it.

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


_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_of(w: Tensor) -> np.ndarray:
    """The raw bit patterns of a floating tensor as a signed-integer numpy array (no copy)."""
    return w.detach().contiguous().view(_INT[w.element_size()]).numpy()


def _as_float(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`_bits_of`."""
    return torch.from_numpy(np.ascontiguousarray(a)).view(dtype)


def _zero_masks(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(zero, negative zero)`` from bit patterns: zero = every bit but the sign bit is clear."""
    sign = np.iinfo(u.dtype).min  # only the sign bit set: -0.0
    return (u & ~sign) == 0, u == sign


def pack_bits(bits: Tensor | np.ndarray) -> Tensor:
    """Bool/0-1 values → ``uint8[ceil(numel/8)]``, row-major, least significant bit first."""
    arr = bits.reshape(-1).to(torch.bool).cpu().numpy() if isinstance(bits, Tensor) else bits.reshape(-1)
    return torch.from_numpy(np.packbits(arr, bitorder="little"))


def _unpack(packed: Tensor, count: int) -> np.ndarray:
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 7) // 8:
        raise CodecError(f"a bit string of {count} bits needs {(count + 7) // 8} uint8 bytes, "
                         f"got {packed.numel()} {packed.dtype}")
    return np.unpackbits(packed.numpy(), count=count, bitorder="little").view(np.bool_)


def unpack_bits(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` bits as a bool tensor."""
    return torch.from_numpy(_unpack(packed, count))


def index_bits(m: int) -> int:
    """Bits per in-group index for groups of ``m`` (``ceil(log2 m)``, at least 1)."""
    return max(1, (m - 1).bit_length())


def pack_indices(idx: Tensor | np.ndarray, bits: int) -> Tensor:
    """Non-negative integers ``< 2**bits`` → a packed bit string, ``bits`` bits each, LSB first."""
    a = np.asarray(idx, dtype=np.uint8).reshape(-1, 1)
    return pack_bits((a >> np.arange(bits, dtype=np.uint8)) & 1)


def _unpack_indices(packed: Tensor, count: int, bits: int) -> np.ndarray:
    b = _unpack(packed, count * bits).reshape(count, bits).astype(np.uint8)
    return (b << np.arange(bits, dtype=np.uint8)).sum(1, dtype=np.uint8)


def unpack_indices(packed: Tensor, count: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_indices`: ``count`` int64 values."""
    return torch.from_numpy(_unpack_indices(packed, count, bits).astype(np.int64))


def encode_bitmask(w: Tensor, with_signs: bool) -> Encoded:
    """``bitmask`` encoding of a 2-D tensor (see the module docstring for the layout)."""
    u = _bits_of(w)
    zero, neg = _zero_masks(u)
    keep = ~zero
    parts = {"values": _as_float(u[keep], w.dtype), "mask": pack_bits(keep)}
    if with_signs:
        parts["signs"] = pack_bits(neg[zero])
    return Encoded("bitmask", parts, {"nnz": int(parts["values"].numel())})


def decode_bitmask(parts: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    numel = math.prod(shape)
    keep = _unpack(parts["mask"], numel)
    values = parts["values"]
    nnz = int(np.count_nonzero(keep))
    if values.dim() != 1 or values.numel() != nnz or values.dtype != dtype:
        raise CodecError(f"mask has {nnz} set bits but values are {values.dtype} {tuple(values.shape)}")
    out = np.zeros(numel, dtype=_np_int(dtype))
    if "signs" in parts:
        out[~keep] = _unpack(parts["signs"], numel - nnz) * np.iinfo(out.dtype).min
    out[keep] = _bits_of(values)
    return _as_float(out, dtype).view(shape)


def encode_nm(w: Tensor, n: int, m: int, with_signs: bool) -> Encoded:
    """``nm`` encoding; every group of ``m`` must hold at most ``n`` non-zeros (the caller checks)."""
    rows, cols = w.shape
    u = _bits_of(w).reshape(rows, cols // m, m)
    zero, neg = _zero_masks(u)
    # non-zeros first, then the earliest zeros; stored in position order
    kept = np.sort(np.argsort(zero, axis=-1, kind="stable")[..., :n], axis=-1)
    parts = {"values": _as_float(np.take_along_axis(u, kept, -1), w.dtype),
             "indices": pack_indices(kept, index_bits(m))}
    if with_signs:
        dropped = np.ones(u.shape, dtype=np.bool_)
        np.put_along_axis(dropped, kept, False, -1)
        parts["signs"] = pack_bits(neg[dropped])
    return Encoded("nm", parts, {"n": n, "m": m, "index_bits": index_bits(m)})


def decode_nm(parts: dict[str, Tensor], shape: tuple[int, int], dtype: torch.dtype, n: int, m: int) -> Tensor:
    rows, cols = shape
    if not (0 < n < m) or cols % m:
        raise CodecError(f"N:M {n}:{m} does not fit a [{rows}, {cols}] weight")
    groups = cols // m
    values = parts["values"]
    if tuple(values.shape) != (rows, groups, n) or values.dtype != dtype:
        raise CodecError(f"values must be {dtype} {(rows, groups, n)}, got {values.dtype} {tuple(values.shape)}")
    idx = _unpack_indices(parts["indices"], rows * groups * n, index_bits(m)).reshape(rows, groups, n)
    increasing = n == 1 or bool((idx[..., 1:] > idx[..., :-1]).all())
    if not increasing or bool((idx >= m).any()):
        raise CodecError(f"in-group indices are not increasing positions below {m}")
    out = np.zeros((rows, groups, m), dtype=_np_int(dtype))
    if "signs" in parts:
        dropped = np.ones(out.shape, dtype=np.bool_)
        np.put_along_axis(dropped, idx.astype(np.intp), False, -1)
        out[dropped] = _unpack(parts["signs"], rows * groups * (m - n)) * np.iinfo(out.dtype).min
    np.put_along_axis(out, idx.astype(np.intp), _bits_of(values), -1)
    return _as_float(out, dtype).view(rows, cols)


def _np_int(dtype: torch.dtype) -> np.dtype:
    return np.dtype(f"int{torch.empty(0, dtype=dtype).element_size() * 8}")


def has_negative_zero(w: Tensor) -> bool:
    return bool(_zero_masks(_bits_of(w))[1].any())


def encoded_sizes(w: Tensor, candidates: tuple[int, ...] = NM_CANDIDATES,
                  signs: bool | None = None) -> list[tuple[int, str, dict]]:
    """``(bytes, encoding, params)`` of every correct encoding of the 2-D floating tensor ``w``.

    ``signs``: whether the ``signs`` bit string is needed (default: whether ``w`` holds a ``-0.0``).
    """
    rows, cols = w.shape
    numel, es = w.numel(), w.element_size()
    zero, neg = _zero_masks(_bits_of(w))
    nnz = numel - int(np.count_nonzero(zero))
    signs = bool(neg.any()) if signs is None else signs
    out = [(numel * es, "dense", {})]
    for m in candidates:
        if m > cols or cols % m:
            continue
        n = max(1, int(np.count_nonzero(~zero.reshape(rows, cols // m, m), axis=-1).max()))
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
    stored as ``nm`` (the 2-bit positions are what sparse 2:4 kernels keep as metadata); for 4:8
    the 3-bit indices cost 1.5 bits per weight against the mask's 1, so a 4:8 layer is stored as
    ``bitmask``.

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
