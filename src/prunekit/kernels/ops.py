"""The sparse decode kernels as Python functions: the C++ extension, or a pure-PyTorch fallback.

Every function computes ``y = W x`` for one token (``x`` a vector) with float32 accumulation and
returns ``y`` in ``x``'s dtype (float32 or bfloat16). Formats (all built once from a dense weight
``W [out, in]``):

* **dense W^T** (``wt [in, out]``): activation sparsity — inputs with ``|x_i| <= t`` skip row ``i``.
* :class:`BitmaskT`: weight sparsity, input-major, in tiles of 128 outputs — per input row and
  tile a 16-bit mask per 16 outputs and the row's non-zeros packed, stored tile by tile; reads
  ``nnz * itemsize + in * out / 8 + 4 * in * tiles`` bytes. Zero activations skip their row
  too, so it serves both kinds of sparsity at once. N:M patterns are stored the same way (one
  bit per weight is exactly the 2 x 2-bit indices of a 2:4 group).
* :class:`CSR16`: weight sparsity, row-major with 16-bit column indices; reads
  ``nnz * (itemsize + 2)`` bytes — more than the bitmask at every density above 1/16.

``stats`` (an int64 tensor of 2) accumulates ``[kept inputs, inputs]`` when given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.activation import keep_mask
from .build import extension

NO_THRESHOLD = torch.tensor([-1.0])  # |x| > -1 keeps every entry, exact zeros included


def _thr(threshold: Tensor | float | None, n: int) -> Tensor:
    if threshold is None:
        return NO_THRESHOLD
    t = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1).contiguous()
    if t.numel() not in (1, n):
        raise ValueError(f"threshold has {t.numel()} entries; expected 1 or {n}")
    return t


def _count(stats: Tensor | None, mask: Tensor) -> None:
    if stats is not None:
        stats[0] += int(mask.sum())
        stats[1] += mask.numel()


#: outputs per bitmask tile (8 chunks of 16): the GEMV holds one tile's outputs in registers
TILE = 128
#: zero values after the last one: the kernels' vector loads may read 31 values past a segment
PAD = 32


@dataclass
class BitmaskT:
    """Tiled input-major bitmask format of a weight ``W [out, in]`` (see the module docstring)."""

    masks: Tensor  # int16 [tiles, in, 8] (bit b of chunk c of tile t, row i: W^T[i, 128 t + 16 c + b] != 0)
    vals: Tensor  # [nnz + PAD], W's dtype: tile by tile, row by row, in output order
    offsets: Tensor  # int32 [tiles, in + 1]: values of tile t before row i
    base: Tensor  # int64 [tiles + 1]: values before tile t
    out: int

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV with every input active reads (values, masks, offsets)."""
        return sum(t.numel() * t.element_size() for t in (self.masks, self.vals, self.offsets, self.base))

    @property
    def nnz(self) -> int:
        return int(self.base[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.out, self.masks.shape[1]


@dataclass
class CSR16:
    """Row-major compressed rows of ``W [out, in]`` with 16-bit column indices."""

    cols: Tensor  # int16 [nnz] (read as uint16)
    vals: Tensor  # [nnz]
    rowptr: Tensor  # int64 [out + 1]
    in_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.cols, self.vals, self.rowptr))


def _u16_as_i16(v: Tensor) -> Tensor:
    v = v.to(torch.int32)
    return torch.where(v > 32767, v - 65536, v).to(torch.int16)


def pack_bitmask(wt: Tensor) -> BitmaskT:
    """:class:`BitmaskT` of the input-major weight ``wt = W^T`` (``[in, out]``, contiguous)."""
    wt = wt.contiguous()
    ext = extension()
    if ext is not None:
        return BitmaskT(*ext.pack_bitmask(wt), wt.shape[1])
    n_in, out = wt.shape
    tiles = -(-out // TILE)
    padded = torch.zeros(n_in, tiles * TILE, dtype=wt.dtype)
    padded[:, :out] = wt
    tiled = padded.view(n_in, tiles, 8, 16).permute(1, 0, 2, 3)  # [tiles, in, 8, 16]
    nz = tiled != 0
    words = (nz.to(torch.int32) << torch.arange(16, dtype=torch.int32)).sum(-1)
    counts = nz.sum((2, 3))  # [tiles, in]
    offsets = torch.zeros(tiles, n_in + 1, dtype=torch.int32)
    offsets[:, 1:] = counts.cumsum(1)
    base = torch.zeros(tiles + 1, dtype=torch.int64)
    base[1:] = counts.sum(1).cumsum(0)
    vals = torch.cat([tiled[nz], torch.zeros(PAD, dtype=wt.dtype)])  # padded like the C++ packer's
    return BitmaskT(_u16_as_i16(words), vals, offsets, base, out)


def _nonzeros(p: BitmaskT) -> Tensor:
    """Bool ``[tiles, in, 8, 16]``: where the non-zeros of each tile sit."""
    bits = ((p.masks.to(torch.int32) & 0xFFFF)[..., None] >> torch.arange(16, dtype=torch.int32)) & 1
    return bits.bool()


def unpack_bitmask(p: BitmaskT) -> Tensor:
    """The dense ``W^T [in, out]`` of a :class:`BitmaskT` (bit for bit; -0.0 comes back as +0.0)."""
    ext = extension()
    if ext is not None:
        return ext.unpack_bitmask(p.masks, p.vals, p.offsets, p.base, p.out)
    tiles, n_in = p.masks.shape[:2]
    nz = _nonzeros(p)
    tiled = torch.zeros(tiles, n_in, 8, 16, dtype=p.vals.dtype)
    tiled[nz] = p.vals[: p.nnz]
    return tiled.permute(1, 0, 2, 3).reshape(n_in, tiles * TILE)[:, : p.out].contiguous()


def pack_csr16(w: Tensor) -> CSR16:
    """:class:`CSR16` of ``W [out, in]`` (``in`` at most 65536)."""
    if w.shape[1] > 65536:
        raise ValueError(f"CSR16 stores 16-bit column indices; this weight has {w.shape[1]} inputs")
    nz = w != 0
    rowptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
    rowptr[1:] = nz.sum(1).cumsum(0)
    return CSR16(_u16_as_i16(nz.nonzero()[:, 1]), w[nz].contiguous(), rowptr, w.shape[1])


def _csr_dense(p: CSR16) -> Tensor:
    out = p.rowptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(out), p.rowptr.diff())
    w = torch.zeros(out, p.in_features, dtype=p.vals.dtype)
    w[rows, p.cols.to(torch.int64) & 0xFFFF] = p.vals
    return w


def _finish(y: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


#: bytes of the weight columns unpacked at once for prefill (they stay in the caches until the matmul)
TILE_BYTES = 4 * 2**20


def bitmask_matmul(x: Tensor, p: BitmaskT, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T`` for many tokens (``x [..., in]``): a dense matmul on ``W^T`` unpacked a few tiles of
    output columns at a time into a cache-sized buffer (the fallback unpacks the whole matrix)."""
    n_in = p.masks.shape[1]
    ext = extension()
    if ext is None:
        y = torch.matmul(x, unpack_bitmask(p))
        return y if bias is None else y + bias
    tiles = p.masks.shape[0]
    step = max(1, min(tiles, TILE_BYTES // (n_in * TILE * p.vals.element_size())))
    x2 = x.reshape(-1, n_in)
    y = torch.empty(x2.shape[0], p.out, dtype=x.dtype)
    buf = torch.empty(n_in, step * TILE, dtype=p.vals.dtype)
    for t0 in range(0, tiles, step):
        t1 = min(tiles, t0 + step)
        c0, c1 = t0 * TILE, min(p.out, t1 * TILE)
        part = buf if t1 - t0 == step else torch.empty(n_in, (t1 - t0) * TILE, dtype=p.vals.dtype)
        ext.unpack_tiles(p.masks, p.vals, p.offsets, p.base, t0, t1, part)
        y[:, c0:c1] = torch.matmul(x2, part[:, : c1 - c0])
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], p.out)


def gemv_t(x: Tensor, wt: Tensor, threshold: Tensor | float | None = None, bias: Tensor | None = None,
           stats: Tensor | None = None) -> Tensor:
    """``W x`` for ``x [in]`` with the input-major ``wt [in, out]``, skipping rows of inputs at or below the
    threshold."""
    thr = _thr(threshold, wt.shape[0])
    ext = extension()
    if ext is not None:
        return ext.gemv_t(x.contiguous(), wt, thr, bias, stats).to(x.dtype)
    mask = keep_mask(x, thr)
    _count(stats, mask)
    return _finish((x.float() * mask) @ wt.float(), bias, x.dtype)


def gemv_bitmask(x: Tensor, p: BitmaskT, threshold: Tensor | float | None = None, bias: Tensor | None = None,
                 stats: Tensor | None = None) -> Tensor:
    """``W x`` from the :class:`BitmaskT` format (rows of inputs at or below the threshold skipped)."""
    thr = _thr(threshold, p.masks.shape[1])
    ext = extension()
    if ext is not None:
        return ext.gemv_bitmask(x.contiguous(), p.masks, p.vals, p.offsets, p.base, p.out, thr, bias,
                                stats).to(x.dtype)
    mask = keep_mask(x, thr)
    _count(stats, mask)
    return _finish((x.float() * mask) @ unpack_bitmask(p).float(), bias, x.dtype)


def gemv_csr16(x: Tensor, p: CSR16, bias: Tensor | None = None) -> Tensor:
    """``W x`` from the :class:`CSR16` format."""
    ext = extension()
    if ext is not None:
        return ext.gemv_csr16(x.contiguous(), p.cols, p.vals, p.rowptr, bias).to(x.dtype)
    return _finish(_csr_dense(p).float() @ x.float(), bias, x.dtype)


def sparse_ffn(h: Tensor, x: Tensor, threshold: Tensor | float | None, wup: Tensor, wdt: Tensor,
               stats: Tensor | None = None) -> Tensor:
    """``down(h' * up(x))`` for one token, ``h' = h`` with entries at or below the threshold zeroed.

    ``wup`` is ``up_proj.weight`` ``[inter, hidden]`` (row-major: a zero channel skips its row) and
    ``wdt`` is ``down_proj.weight`` transposed, ``[inter, hidden]`` (input-major: it skips its row too).
    """
    thr = _thr(threshold, wup.shape[0])
    ext = extension()
    if ext is not None:
        return ext.sparse_ffn(h.contiguous(), x.contiguous(), thr, wup, wdt, stats).to(x.dtype)
    mask = keep_mask(h, thr)
    _count(stats, mask)
    u = wup.float() @ x.float()
    return ((h.float() * mask * u) @ wdt.float()).to(x.dtype)
