"""The sparse decode kernels equal the dense masked matmul, on both paths (C++ and PyTorch fallback).

Tolerances, against a float64 reference computed from the same (float32 or bfloat16) values, with
``scale = |x'| @ |W|^T`` (the sum of the magnitudes a dot product adds up):

* float32: ``|y - ref| <= 1e-5 * scale + 1e-6`` (float32 accumulation in another order);
* bfloat16: ``|y - ref| <= 4e-3 * scale + 1e-6`` (the result is rounded to bfloat16: 2^-9 relative).

The C++ path is exercised with its detected code (AVX-512 where the CPU has it), its AVX2 code (the
bitmask kernels' path on CPUs without AVX-512; skipped without AVX2) and its portable code.
"""

from __future__ import annotations

import pytest
import torch

from prunekit.kernels import build, ops

SHAPES = [(37, 53), (64, 17), (129, 255), (1, 1), (300, 16), (16, 1000), (7, 256)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3}


@pytest.fixture(params=["cpp", "cpp-avx2", "cpp-portable", "torch"])
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("PRUNEKIT_KERNELS", "off")
        build.reset()
        yield "torch"
        build.reset()
        return
    monkeypatch.delenv("PRUNEKIT_KERNELS", raising=False)
    build.reset()
    ext = build.extension()
    if ext is None:
        pytest.skip(f"C++ kernels unavailable: {build.why_unavailable()}")
    if request.param == "cpp-portable":
        ext.set_isa(0)
    if request.param == "cpp-avx2":
        try:
            ext.set_isa(2)
        except RuntimeError as e:
            pytest.skip(str(e).splitlines()[0])
    yield request.param
    ext.set_isa(-1)
    build.reset()


def _weight(out, n_in, sparsity, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g)
    if sparsity > 0:
        w[torch.rand(out, n_in, generator=g) < sparsity] = 0
    return w.to(dtype)


def _x(n, dtype, zeros=0.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.rand(n, generator=g) < zeros] = 0
    return x.to(dtype)


def _check(y, x_kept, w, dtype, bias=None):
    ref = x_kept.double() @ w.double().t() + (0 if bias is None else bias.double())
    scale = x_kept.double().abs() @ w.double().abs().t() + (0 if bias is None else bias.double().abs())
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert bool((err <= TOL[dtype] * scale + 1e-6).all()), float((err - TOL[dtype] * scale).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_t_matches_masked_matmul(path, dtype, shape):
    n_in, out = shape
    w, x = _weight(out, n_in, 0.0, dtype), _x(n_in, dtype)
    t = float(x.float().abs().median())
    stats = torch.zeros(2, dtype=torch.int64)
    y = ops.gemv_t(x, w.t().contiguous(), t, stats=stats)
    kept = x * (x.float().abs() > t)
    _check(y, kept, w, dtype)
    assert stats.tolist() == [int((x.float().abs() > t).sum()), n_in]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_t_all_zero_and_fully_dense(path, dtype):
    w = _weight(45, 77, 0.0, dtype)
    wt = w.t().contiguous()
    bias = torch.randn(45).to(dtype)
    y = ops.gemv_t(torch.zeros(77, dtype=dtype), wt, 0.0, bias=bias)
    assert torch.equal(y, bias.float().to(dtype))  # no active input: the bias alone
    x = _x(77, dtype, zeros=0.3)
    _check(ops.gemv_t(x, wt, None), x, w, dtype)  # no threshold: every row, zeros included
    t = torch.rand(77) * 0.5  # one threshold per channel (CHESS)
    _check(ops.gemv_t(x, wt, t), x * (x.float().abs() > t), w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_bitmask_matches_and_round_trips(path, dtype, shape, sparsity):
    n_in, out = shape
    w, x = _weight(out, n_in, sparsity, dtype), _x(n_in, dtype)
    p = ops.pack_bitmask(w.t().contiguous())
    assert torch.equal(ops.unpack_bitmask(p), w.t())
    assert p.nnz == int((w != 0).sum())
    _check(ops.gemv_bitmask(x, p), x, w, dtype)
    t = float(x.float().abs().quantile(0.4))  # both kinds of sparsity at once
    _check(ops.gemv_bitmask(x, p, t), x * (x.float().abs() > t), w, dtype)


def test_bitmask_n_m_pattern(path):
    from prunekit.masks import nm_mask

    w = torch.randn(24, 64)
    w = w * nm_mask(w.abs(), 2, 4)
    p = ops.pack_bitmask(w.t().contiguous())
    assert p.nnz == w.numel() // 2
    _check(ops.gemv_bitmask(_x(64, torch.float32), p), _x(64, torch.float32), w, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_csr16_matches(path, dtype, shape):
    n_in, out = shape
    w, x = _weight(out, n_in, 0.6, dtype), _x(n_in, dtype)
    bias = torch.randn(out).to(dtype)
    p = ops.pack_csr16(w)
    _check(ops.gemv_csr16(x, p, bias), x, w, dtype, bias)


def test_csr16_rejects_wide_inputs():
    with pytest.raises(ValueError, match="16-bit"):
        ops.pack_csr16(torch.zeros(2, 70000))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter,hidden", [(53, 37), (128, 64), (1, 5)])
def test_sparse_ffn_matches_masked_mlp(path, dtype, inter, hidden):
    g = torch.Generator().manual_seed(3)
    wup = torch.randn(inter, hidden, generator=g).to(dtype)
    wdown = torch.randn(hidden, inter, generator=g).to(dtype)
    x = _x(hidden, dtype)
    h = torch.nn.functional.silu(torch.randn(inter, generator=g)).to(dtype)
    for t in (0.2, torch.rand(inter, generator=g) * 0.3, None):
        thr = torch.tensor(-1.0) if t is None else torch.as_tensor(t)
        kept = h.double() * (h.float().abs() > thr).double()
        inner = kept * (wup.double() @ x.double())
        ref = wdown.double() @ inner
        scale = wdown.double().abs() @ (kept.abs() * (wup.double().abs() @ x.double().abs()))
        y = ops.sparse_ffn(h, x, t, wup, wdown.t().contiguous())
        assert bool(((y.double() - ref).abs() <= TOL[dtype] * 2 * scale + 1e-6).all())


def test_threshold_size_is_checked():
    with pytest.raises(ValueError, match="expected 1 or 4"):
        ops.gemv_t(torch.zeros(4), torch.zeros(4, 3), torch.zeros(3))


def test_fallback_says_why(monkeypatch):
    monkeypatch.setenv("PRUNEKIT_KERNELS", "off")
    build.reset()
    try:
        assert not build.available() and "PRUNEKIT_KERNELS=off" in build.why_unavailable()
    finally:
        build.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 53), (300, 1000), (16, 17), (9, 897)])
def test_bitmask_prefill_matmul_in_tiles(path, dtype, shape, monkeypatch):
    n_in, out = shape
    # three 128-column tiles per unpacked group: several groups, a short last group, a partial last tile
    monkeypatch.setattr(ops, "TILE_BYTES", 3 * n_in * ops.TILE * torch.finfo(dtype).bits // 8)
    w = _weight(out, n_in, 0.5, dtype)
    x = torch.randn(3, 5, n_in).to(dtype)
    bias = torch.randn(out).to(dtype)
    p = ops.pack_bitmask(w.t().contiguous())
    y = ops.bitmask_matmul(x, p, bias)
    ref = torch.nn.functional.linear(x, w, bias)
    assert y.shape == ref.shape
    assert torch.allclose(y.float(), ref.float(), rtol=TOL[dtype] * 2, atol=TOL[dtype] * 2 * (n_in ** 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_gemv_does_not_depend_on_thread_count(path, dtype):
    w, x = _weight(1000, 300, 0.5, dtype), _x(300, dtype, zeros=0.3)
    p = ops.pack_bitmask(w.t().contiguous())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.gemv_bitmask(x, p, 0.1)
        torch.set_num_threads(3)
        three = ops.gemv_bitmask(x, p, 0.1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
