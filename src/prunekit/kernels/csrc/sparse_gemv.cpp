// Sparse GEMV kernels for batch-1 decoding on CPUs (prunekit.kernels).
//
// Decoding one token multiplies every weight matrix by one vector: the time is the time to read
// the weights from memory. These kernels read fewer bytes:
//
//   gemv_t        activation sparsity: weights stored input-major (W^T, [in, out] row-major), so
//                 the weights of a zero input channel are one contiguous row that is never read.
//   gemv_bitmask  weight sparsity (bitmask.cpp): per input row of W^T and tile of 128 outputs,
//                 a 16-bit mask per 16 outputs and the non-zeros packed (AVX-512 expands them
//                 into place); rows of zero activations are skipped too (both kinds at once).
//   gemv_csr16    weight sparsity, the alternative measured against the bitmask: per output row
//                 of W, the non-zeros and their 16-bit column indices (gathers x).
//   sparse_ffn    a gated MLP with a thresholded activation h = act(gate(x)) (CATS, CHESS): only
//                 the rows of up_proj (row-major) and of down_proj^T whose h survives are read.
//
// Every kernel computes in float32 (bfloat16 weights are widened on load) and works on float32
// or bfloat16 tensors. gemv_t and sparse_ffn split the active rows into one contiguous part per
// thread, each with its own accumulator, summed in a fixed order (results depend on the thread
// count only, not on scheduling); the bitmask GEMV gives each thread whole tiles of outputs.
// Threads come from ATen's OpenMP pool (at::parallel_for), the one torch itself uses. Each
// kernel has an AVX-512 path (chosen at run time when the CPU has AVX-512F/BW/VL/VBMI2) and a
// portable path the compiler vectorises.
#include "common.h"

namespace pk {
namespace {

// Split [0, n) into `parts` contiguous ranges, run fn(part, begin, end) on ATen's threads.
template <typename F>
void for_parts(int64_t n, int64_t parts, const F& fn) {
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(p, n * p / parts, n * (p + 1) / parts);
  });
}

int64_t n_parts(int64_t rows, int64_t min_rows) {
  int64_t t = at::get_num_threads();
  int64_t by_size = std::max<int64_t>(1, rows / min_rows);
  return std::max<int64_t>(1, std::min(t, by_size));
}

// y = sum over parts of acc (+ bias), as a float32 tensor of `out` entries.
torch::Tensor reduce(const std::vector<float>& acc, int64_t parts, int64_t stride, int64_t out,
                     const c10::optional<torch::Tensor>& bias) {
  auto y = torch::empty({out}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  for (int64_t j = 0; j < out; ++j) yp[j] = acc[j];
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t j = 0; j < out; ++j) yp[j] += acc[p * stride + j];
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat32));
  return y;
}

// ---------------------------------------------------------------- activation-sparse, W^T dense
template <typename T>
void axpy_rows(const T* wt, int64_t out, const int32_t* idx, const float* xa, int64_t k0, int64_t k1,
               float* __restrict acc) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const T* __restrict w0 = wt + static_cast<int64_t>(idx[k]) * out;
    const T* __restrict w1 = wt + static_cast<int64_t>(idx[k + 1]) * out;
    const T* __restrict w2 = wt + static_cast<int64_t>(idx[k + 2]) * out;
    const T* __restrict w3 = wt + static_cast<int64_t>(idx[k + 3]) * out;
    const float a0 = xa[k], a1 = xa[k + 1], a2 = xa[k + 2], a3 = xa[k + 3];
#pragma GCC ivdep
    for (int64_t j = 0; j < out; ++j)
      acc[j] += a0 * tof(w0[j]) + a1 * tof(w1[j]) + a2 * tof(w2[j]) + a3 * tof(w3[j]);
  }
  for (; k < k1; ++k) {
    const T* __restrict w0 = wt + static_cast<int64_t>(idx[k]) * out;
    const float a0 = xa[k];
#pragma GCC ivdep
    for (int64_t j = 0; j < out; ++j) acc[j] += a0 * tof(w0[j]);
  }
}

#if PK_X86
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen16(const float* w) { return _mm512_loadu_ps(w); }
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen16(const uint16_t* w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))), 16));
}

// acc[0:out) += sum_k xa[k] * wt[idx[k], 0:out), four rows at a time, 16 outputs per vector.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void axpy_rows_avx512(const T* wt, int64_t out, const int32_t* idx, const float* xa, int64_t k0, int64_t k1,
                      float* acc) {
  const int64_t full = out / 16 * 16;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const T* w0 = wt + static_cast<int64_t>(idx[k]) * out;
    const T* w1 = wt + static_cast<int64_t>(idx[k + 1]) * out;
    const T* w2 = wt + static_cast<int64_t>(idx[k + 2]) * out;
    const T* w3 = wt + static_cast<int64_t>(idx[k + 3]) * out;
    const __m512 a0 = _mm512_set1_ps(xa[k]), a1 = _mm512_set1_ps(xa[k + 1]);
    const __m512 a2 = _mm512_set1_ps(xa[k + 2]), a3 = _mm512_set1_ps(xa[k + 3]);
    int64_t j = 0;
    for (; j < full; j += 16) {
      __m512 s = _mm512_loadu_ps(acc + j);
      s = _mm512_fmadd_ps(a0, widen16(w0 + j), s);
      s = _mm512_fmadd_ps(a1, widen16(w1 + j), s);
      s = _mm512_fmadd_ps(a2, widen16(w2 + j), s);
      s = _mm512_fmadd_ps(a3, widen16(w3 + j), s);
      _mm512_storeu_ps(acc + j, s);
    }
    for (; j < out; ++j)
      acc[j] += xa[k] * tof(w0[j]) + xa[k + 1] * tof(w1[j]) + xa[k + 2] * tof(w2[j]) + xa[k + 3] * tof(w3[j]);
  }
  if (k < k1) axpy_rows<T>(wt, out, idx, xa, k, k1, acc);
}
#endif

template <typename T>
torch::Tensor gemv_t_impl(const torch::Tensor& x, const torch::Tensor& wt, const torch::Tensor& thr,
                          const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& stats) {
  const int64_t in = wt.size(0), out = wt.size(1);
  std::vector<int32_t> idx(in);
  std::vector<float> xa(in);
  const int64_t nact = active<T>(ptr<T>(x), in, thr.data_ptr<float>(), thr.numel() > 1, idx.data(), xa.data());
  if (stats.has_value()) {
    stats->data_ptr<int64_t>()[0] += nact;
    stats->data_ptr<int64_t>()[1] += in;
  }
  const int64_t parts = n_parts(nact, 64), stride = (out + 15) / 16 * 16;
  std::vector<float> acc(parts * stride, 0.0f);
  const T* w = ptr<T>(wt);
  const bool wide = isa() == 1;
  for_parts(nact, parts, [&](int64_t p, int64_t b, int64_t e) {
#if PK_X86
    if (wide) {
      axpy_rows_avx512<T>(w, out, idx.data(), xa.data(), b, e, acc.data() + p * stride);
      return;
    }
#endif
    axpy_rows<T>(w, out, idx.data(), xa.data(), b, e, acc.data() + p * stride);
  });
  return reduce(acc, parts, stride, out, bias);
}

// ---------------------------------------------------------------- CSR, 16-bit column indices
template <typename T>
float dot_csr_portable(const uint16_t* cols, const T* vals, int64_t n, const float* xf) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int l = 0; l < 8; ++l) s[l] += tof(vals[k + l]) * xf[cols[k + l]];
  float t = 0;
  for (; k < n; ++k) t += tof(vals[k]) * xf[cols[k]];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + t;
}

#if PK_X86
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 load16(const float* v, __mmask16 m) { return _mm512_maskz_loadu_ps(m, v); }
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 load16(const uint16_t* v, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, v)), 16));
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
float dot_csr_avx512(const uint16_t* cols, const T* vals, int64_t n, const float* xf) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const int64_t r = n - k;
    const __mmask16 m = r >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << r) - 1);
    const __m512i ci = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, cols + k));
    const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, ci, xf, 4);
    s = _mm512_fmadd_ps(load16(vals + k, m), xv, s);
  }
  return _mm512_reduce_add_ps(s);
}
#endif

template <typename T>
torch::Tensor gemv_csr16_impl(const torch::Tensor& x, const torch::Tensor& cols, const torch::Tensor& vals,
                              const torch::Tensor& rowptr, const c10::optional<torch::Tensor>& bias) {
  const int64_t out = rowptr.size(0) - 1, in = x.numel();
  std::vector<float> xf(in);
  const T* xp = ptr<T>(x);
  for (int64_t i = 0; i < in; ++i) xf[i] = tof(xp[i]);
  auto y = torch::empty({out}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  const uint16_t* c = reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>());
  const T* v = ptr<T>(vals);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const bool wide = isa() == 1;
  for_parts(out, n_parts(out, 16), [&](int64_t, int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const int64_t s = rp[o], n = rp[o + 1] - s;
#if PK_X86
      if (wide) {
        yp[o] = dot_csr_avx512<T>(c + s, v + s, n, xf.data());
        continue;
      }
#endif
      yp[o] = dot_csr_portable<T>(c + s, v + s, n, xf.data());
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat32));
  return y;
}

// ---------------------------------------------------------------- gated MLP with sparse activation
template <typename T>
float dot_dense(const T* __restrict w, const float* __restrict xf, int64_t n) {
  float s[16] = {0};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) s[l] += tof(w[j + l]) * xf[j + l];
  float t = 0;
  for (; j < n; ++j) t += tof(w[j]) * xf[j];
  for (int l = 0; l < 16; ++l) t += s[l];
  return t;
}

template <typename T>
torch::Tensor sparse_ffn_impl(const torch::Tensor& h, const torch::Tensor& x, const torch::Tensor& thr,
                              const torch::Tensor& wup, const torch::Tensor& wdt,
                              const c10::optional<torch::Tensor>& stats) {
  const int64_t inter = wup.size(0), hidden = wup.size(1);
  std::vector<int32_t> idx(inter);
  std::vector<float> ha(inter), xf(hidden);
  const int64_t nact = active<T>(ptr<T>(h), inter, thr.data_ptr<float>(), thr.numel() > 1, idx.data(), ha.data());
  if (stats.has_value()) {
    stats->data_ptr<int64_t>()[0] += nact;
    stats->data_ptr<int64_t>()[1] += inter;
  }
  const T* xp = ptr<T>(x);
  for (int64_t j = 0; j < hidden; ++j) xf[j] = tof(xp[j]);
  const int64_t parts = n_parts(nact, 32), stride = (hidden + 15) / 16 * 16;
  std::vector<float> acc(parts * stride, 0.0f);
  const T* wu = ptr<T>(wup);
  const T* wd = ptr<T>(wdt);
  for_parts(nact, parts, [&](int64_t p, int64_t b, int64_t e) {
    // up rows first (the product h * up), then the down rows of the same channels
    std::vector<float> c(e - b);
    for (int64_t k = b; k < e; ++k)
      c[k - b] = ha[k] * dot_dense<T>(wu + static_cast<int64_t>(idx[k]) * hidden, xf.data(), hidden);
#if PK_X86
    if (isa() == 1) {
      axpy_rows_avx512<T>(wd, hidden, idx.data() + b, c.data(), 0, e - b, acc.data() + p * stride);
      return;
    }
#endif
    axpy_rows<T>(wd, hidden, idx.data() + b, c.data(), 0, e - b, acc.data() + p * stride);
  });
  return reduce(acc, parts, stride, hidden, c10::nullopt);
}

// ---------------------------------------------------------------- dispatch on dtype
torch::Tensor gemv_t(torch::Tensor x, torch::Tensor wt, torch::Tensor thr, c10::optional<torch::Tensor> bias,
                     c10::optional<torch::Tensor> stats) {
  check_vec(x, "x");
  check_vec(wt, "wt");
  TORCH_CHECK(wt.dim() == 2 && x.numel() == wt.size(0) && wt.scalar_type() == x.scalar_type(), "shape/dtype mismatch");
  check_thr(thr, wt.size(0));
  return PK_DISPATCH(x, gemv_t_impl, x, wt, thr, bias, stats);
}

torch::Tensor gemv_csr16(torch::Tensor x, torch::Tensor cols, torch::Tensor vals, torch::Tensor rowptr,
                         c10::optional<torch::Tensor> bias) {
  check_vec(x, "x");
  TORCH_CHECK(vals.scalar_type() == x.scalar_type() && cols.numel() == vals.numel(), "values/columns mismatch");
  return PK_DISPATCH(x, gemv_csr16_impl, x, cols, vals, rowptr, bias);
}

torch::Tensor sparse_ffn(torch::Tensor h, torch::Tensor x, torch::Tensor thr, torch::Tensor wup, torch::Tensor wdt,
                         c10::optional<torch::Tensor> stats) {
  check_vec(h, "h");
  check_vec(x, "x");
  TORCH_CHECK(wup.sizes() == wdt.sizes() && wup.size(0) == h.numel() && wup.size(1) == x.numel() &&
              wup.scalar_type() == h.scalar_type() && wdt.scalar_type() == h.scalar_type(), "shape/dtype mismatch");
  check_thr(thr, h.numel());
  return PK_DISPATCH(h, sparse_ffn_impl, h, x, thr, wup, wdt, stats);
}

int64_t get_isa() { return isa(); }
void set_isa(int64_t v) {
  TORCH_CHECK(v >= -1 && v <= 2, "isa must be -1 (detect), 0 (portable), 1 (avx512) or 2 (avx2)");
  TORCH_CHECK(v != 1 || has_avx512(), "this CPU lacks AVX-512 F/BW/VL/VBMI2");
  TORCH_CHECK(v != 2 || has_avx2(), "this CPU lacks AVX2 / FMA");
  g_isa = v;
}

}  // namespace
}  // namespace pk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pk;
  m.def("gemv_t", &gemv_t, "activation-sparse GEMV on input-major weights");
  m.def("gemv_bitmask", &gemv_bitmask, "bitmask weight-sparse (and activation-sparse) GEMV");
  m.def("gemv_csr16", &gemv_csr16, "CSR GEMV with 16-bit column indices");
  m.def("sparse_ffn", &sparse_ffn, "gated MLP with a thresholded activation");
  m.def("pack_bitmask", &pack_bitmask, "pack input-major weights into masks, values, offsets, tile bases");
  m.def("unpack_bitmask", &unpack_bitmask, "dense input-major weights from the bitmask format");
  m.def("unpack_tiles", &unpack_tiles, "tiles [t0, t1) of a bitmask W^T, dense, into a buffer");
  m.def("get_isa", &get_isa, "0: portable path, 1: AVX-512 path, 2: AVX2 path (bitmask kernels)");
  m.def("set_isa", &set_isa, "-1: detect, 0: force the portable path, 1: AVX-512 path, 2: AVX2 path");
}
