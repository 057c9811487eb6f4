"""The sparse decode kernels as Python functions: the C++ extension, or a pure-PyTorch fallback.

Every function computes ``y = W x`` for one token (``x`` a vector) with float32 accumulation and
returns ``y`` in ``x``'s dtype (float32 or bfloat16). Formats (all built once from a dense weight
``W [out, in]``):

* **dense W^T** (``wt [in, out]``): activation sparsity — inputs with ``|x_i| <= t`` skip row ``i``.
* :class:`BitmaskT`: weight sparsity, input-major — per input row a 16-bit mask per 16 outputs and
  the row's non-zeros packed; reads ``nnz * itemsize + in * out / 8`` bytes. Zero activations
  skip their row too, so it serves both kinds of sparsity at once. N:M patterns are stored the
  same way (one bit per weight is exactly the 2 x 2-bit indices of a 2:4 group).
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


@dataclass
class BitmaskT:
    """Input-major bitmask format of a weight ``W [out, in]`` (see the module docstring)."""

    masks: Tensor  # int16 [in, ceil(out / 16)] (bit b of word c: output 16 c + b)
    vals: Tensor  # [nnz + 16], W's dtype, row by row of W^T (16 zeros of padding at the end)
    rowptr: Tensor  # int64 [in + 1]
    out: int
    tile_chunks: int = 0  # prefill tiles: 16-column chunks per tile (set at the first prefill)
    tile_offsets: Tensor | None = None  # int32 [in, tiles]: values of each row before each tile

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV with every input active reads (values, masks, row pointers)."""
        return sum(t.numel() * t.element_size() for t in (self.masks, self.vals, self.rowptr))

    @property
    def shape(self) -> tuple[int, int]:
        return self.out, self.masks.shape[0]


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
        masks, vals, rowptr = ext.pack_bitmask(wt)
        return BitmaskT(masks, vals, rowptr, wt.shape[1])
    n_in, out = wt.shape
    chunks = -(-out // 16)
    padded = torch.zeros(n_in, chunks * 16, dtype=wt.dtype)
    padded[:, :out] = wt
    nz = padded != 0
    words = (nz.view(n_in, chunks, 16).to(torch.int32) << torch.arange(16, dtype=torch.int32)).sum(-1)
    rowptr = torch.zeros(n_in + 1, dtype=torch.int64)
    rowptr[1:] = nz.sum(1).cumsum(0)
    vals = torch.cat([padded[nz], torch.zeros(16, dtype=wt.dtype)])  # padded like the C++ packer's
    return BitmaskT(_u16_as_i16(words), vals, rowptr, out)


def unpack_bitmask(p: BitmaskT) -> Tensor:
    """The dense ``W^T [in, out]`` of a :class:`BitmaskT` (bit for bit; -0.0 comes back as +0.0)."""
    ext = extension()
    if ext is not None:
        return ext.unpack_bitmask(p.masks, p.vals, p.rowptr, p.out)
    n_in, chunks = p.masks.shape
    bits = ((p.masks.to(torch.int32) & 0xFFFF)[:, :, None] >> torch.arange(16, dtype=torch.int32)) & 1
    nz = bits.reshape(n_in, chunks * 16).bool()
    wt = torch.zeros(n_in, chunks * 16, dtype=p.vals.dtype)
    wt[nz] = p.vals[: int(p.rowptr[-1])]
    return wt[:, : p.out].contiguous()


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


#: bytes of one unpacked prefill tile (it stays in the caches between unpacking and the matmul)
TILE_BYTES = 4 * 2**20


def bitmask_matmul(x: Tensor, p: BitmaskT, bias: Tensor | None = None) -> Tensor:
    """``x @ W^T`` for many tokens (``x [..., in]``): a dense matmul on ``W^T`` unpacked one tile of
    output columns at a time into a cache-sized buffer (the fallback unpacks the whole matrix)."""
    n_in = p.masks.shape[0]
    ext = extension()
    if ext is None:
        y = torch.matmul(x, unpack_bitmask(p))
        return y if bias is None else y + bias
    if p.tile_offsets is None:
        chunks = p.masks.shape[1]
        p.tile_chunks = max(1, min(chunks, TILE_BYTES // (n_in * 16 * p.vals.element_size())))
        p.tile_offsets = ext.tile_offsets(p.masks, p.tile_chunks)
    x2 = x.reshape(-1, n_in)
    y = torch.empty(x2.shape[0], p.out, dtype=x.dtype)
    width = 16 * p.tile_chunks
    buf = torch.empty(n_in, width, dtype=p.vals.dtype)
    for t in range(p.tile_offsets.shape[1]):
        c0, c1 = t * width, min(p.out, (t + 1) * width)
        ext.unpack_tile(p.masks, p.vals, p.rowptr, p.tile_offsets, t, p.tile_chunks, buf)
        y[:, c0:c1] = torch.matmul(x2, buf[:, : c1 - c0])
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], p.out)


def gemv_t(x: Tensor, wt: Tensor, threshold: Tensor | float | None = None, bias: Tensor | None = None,
           stats: Tensor | None = None) -> Tensor:
    """``W x`` for ``x [in]`` with the input-major ``wt [in, out]``, skipping rows of inputs at or below the threshold."""
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
    thr = _thr(threshold, p.masks.shape[0])
    ext = extension()
    if ext is not None:
        return ext.gemv_bitmask(x.contiguous(), p.masks, p.vals, p.rowptr, p.out, thr, bias, stats).to(x.dtype)
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
