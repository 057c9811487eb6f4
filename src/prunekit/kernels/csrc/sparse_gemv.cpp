// Sparse GEMV kernels for batch-1 decoding on CPUs (prunekit.kernels).
//
// Decoding one token multiplies every weight matrix by one vector: the time is the time to read
// the weights from memory. These kernels read fewer bytes:
//
//   gemv_t        activation sparsity: weights stored input-major (W^T, [in, out] row-major), so
//                 the weights of a zero input channel are one contiguous row that is never read.
//   gemv_bitmask  weight sparsity: per input row of W^T, a 16-bit mask per 16 outputs and the
//                 non-zeros packed (AVX-512 expand-loads them into place); rows of zero
//                 activations are skipped too (both kinds of sparsity at once).
//   gemv_csr16    weight sparsity, the alternative measured against the bitmask: per output row
//                 of W, the non-zeros and their 16-bit column indices (gathers x).
//   sparse_ffn    a gated MLP with a thresholded activation h = act(gate(x)) (CATS, CHESS): only
//                 the rows of up_proj (row-major) and of down_proj^T whose h survives are read.
//
// Every kernel computes in float32 (bfloat16 weights are widened on load) and works on float32
// or bfloat16 tensors. Work is split into one contiguous part of the active rows per thread,
// each with its own accumulator, summed in a fixed order: results depend on the thread count
// only, not on scheduling. Threads come from ATen's OpenMP pool (at::parallel_for), the one
// torch itself uses. Each kernel has an AVX-512 path (chosen at run time when the CPU has
// AVX-512F/BW/VL/VBMI2) and a portable path the compiler vectorises.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PK_X86 1
#endif

namespace {

int g_isa = -1;  // -1 undetected, 0 portable, 1 avx512

int isa() {
  if (g_isa < 0) {
#if PK_X86
    __builtin_cpu_init();
    g_isa = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2")) ? 1 : 0;
#else
    g_isa = 0;
#endif
  }
  return g_isa;
}

inline float tof(float v) { return v; }
inline float tof(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> const T* ptr(const torch::Tensor& t);
template <> const float* ptr<float>(const torch::Tensor& t) { return t.data_ptr<float>(); }
template <> const uint16_t* ptr<uint16_t>(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// Active input channels: |x_i| > threshold (one threshold, or one per channel).
template <typename T>
int64_t active(const T* x, int64_t n, const float* thr, bool per_channel, int32_t* idx, float* xa) {
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    float v = tof(x[i]);
    float t = per_channel ? thr[i] : thr[0];
    if (std::fabs(v) > t) {
      idx[k] = static_cast<int32_t>(i);
      xa[k] = v;
      ++k;
    }
  }
  return k;
}

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

// ---------------------------------------------------------------- bitmask W^T (weight sparsity)
template <typename T>
void bitmask_rows_portable(const uint16_t* masks, const T* vals, const int64_t* rowptr, int64_t chunks,
                           const int32_t* idx, const float* xa, int64_t k0, int64_t k1, float* acc) {
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = idx[k];
    const float a = xa[k];
    const uint16_t* m = masks + i * chunks;
    const T* v = vals + rowptr[i];
    for (int64_t c = 0; c < chunks; ++c) {
      uint32_t mk = m[c];
      float* ac = acc + 16 * c;
      while (mk) {
        const int b = __builtin_ctz(mk);
        ac[b] += a * tof(*v++);
        mk &= mk - 1;
      }
    }
  }
}

#if PK_X86
// Register-form expands: the memory form (vexpandps zmm{k}, [mem]) is microcoded and slow on AMD
// Zen 4. The full 16-value load may read up to 15 values past a row: the packed values are padded.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
inline __m512 expand16(uint16_t mk, const float*& v) {
  __m512 w = _mm512_maskz_expand_ps(static_cast<__mmask16>(mk), _mm512_loadu_ps(v));
  v += __builtin_popcount(mk);
  return w;
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
inline __m512 expand16(uint16_t mk, const uint16_t*& v) {
  __m256i h = _mm256_maskz_expand_epi16(static_cast<__mmask16>(mk), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  v += __builtin_popcount(mk);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
void bitmask_rows_avx512(const uint16_t* masks, const T* vals, const int64_t* rowptr, int64_t chunks,
                         const int32_t* idx, const float* xa, int64_t k0, int64_t k1, float* acc) {
  int64_t k = k0;
  for (; k + 2 <= k1; k += 2) {
    const uint16_t* m0 = masks + static_cast<int64_t>(idx[k]) * chunks;
    const uint16_t* m1 = masks + static_cast<int64_t>(idx[k + 1]) * chunks;
    const T* v0 = vals + rowptr[idx[k]];
    const T* v1 = vals + rowptr[idx[k + 1]];
    const __m512 a0 = _mm512_set1_ps(xa[k]), a1 = _mm512_set1_ps(xa[k + 1]);
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 s = _mm512_loadu_ps(acc + 16 * c);
      s = _mm512_fmadd_ps(a0, expand16(m0[c], v0), s);
      s = _mm512_fmadd_ps(a1, expand16(m1[c], v1), s);
      _mm512_storeu_ps(acc + 16 * c, s);
    }
  }
  for (; k < k1; ++k) {
    const uint16_t* m0 = masks + static_cast<int64_t>(idx[k]) * chunks;
    const T* v0 = vals + rowptr[idx[k]];
    const __m512 a0 = _mm512_set1_ps(xa[k]);
    for (int64_t c = 0; c < chunks; ++c) {
      __m512 s = _mm512_loadu_ps(acc + 16 * c);
      _mm512_storeu_ps(acc + 16 * c, _mm512_fmadd_ps(a0, expand16(m0[c], v0), s));
    }
  }
}
#endif

template <typename T>
torch::Tensor gemv_bitmask_impl(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& vals,
                                const torch::Tensor& rowptr, int64_t out, const torch::Tensor& thr,
                                const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& stats) {
  const int64_t in = masks.size(0), chunks = masks.size(1);
  std::vector<int32_t> idx(in);
  std::vector<float> xa(in);
  const int64_t nact = active<T>(ptr<T>(x), in, thr.data_ptr<float>(), thr.numel() > 1, idx.data(), xa.data());
  if (stats.has_value()) {
    stats->data_ptr<int64_t>()[0] += nact;
    stats->data_ptr<int64_t>()[1] += in;
  }
  const int64_t parts = n_parts(nact, 64), stride = chunks * 16;
  std::vector<float> acc(parts * stride, 0.0f);
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
  const T* v = ptr<T>(vals);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const bool wide = isa() == 1;
  for_parts(nact, parts, [&](int64_t p, int64_t b, int64_t e) {
#if PK_X86
    if (wide) {
      bitmask_rows_avx512<T>(m, v, rp, chunks, idx.data(), xa.data(), b, e, acc.data() + p * stride);
      return;
    }
#endif
    bitmask_rows_portable<T>(m, v, rp, chunks, idx.data(), xa.data(), b, e, acc.data() + p * stride);
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

// ---------------------------------------------------------------- packing and unpacking
template <typename T>
std::vector<torch::Tensor> pack_bitmask_impl(const torch::Tensor& wt) {
  const int64_t in = wt.size(0), out = wt.size(1), chunks = (out + 15) / 16;
  const T* w = ptr<T>(wt);
  auto rowptr = torch::zeros({in + 1}, torch::kInt64);
  int64_t* rp = rowptr.data_ptr<int64_t>();
  auto masks = torch::zeros({in, chunks}, torch::kInt16);
  uint16_t* m = reinterpret_cast<uint16_t*>(masks.data_ptr<int16_t>());
  at::parallel_for(0, in, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int64_t n = 0;
      for (int64_t j = 0; j < out; ++j) {
        if (tof(w[i * out + j]) != 0.0f) {  // -0.0 counts as zero (unpacked as +0.0)
          m[i * chunks + j / 16] |= static_cast<uint16_t>(1u << (j % 16));
          ++n;
        }
      }
      rp[i + 1] = n;
    }
  });
  for (int64_t i = 0; i < in; ++i) rp[i + 1] += rp[i];
  auto vals = torch::zeros({rp[in] + 16}, wt.options());  // +16: the expands' full loads stay inside
  T* v = const_cast<T*>(ptr<T>(vals));
  at::parallel_for(0, in, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T* dst = v + rp[i];
      for (int64_t j = 0; j < out; ++j)
        if (m[i * chunks + j / 16] & (1u << (j % 16))) *dst++ = w[i * out + j];
    }
  });
  return {masks, vals, rowptr};
}

template <typename T>
torch::Tensor unpack_bitmask_impl(const torch::Tensor& masks, const torch::Tensor& vals, const torch::Tensor& rowptr,
                                  int64_t out) {
  const int64_t in = masks.size(0), chunks = masks.size(1);
  auto wt = torch::zeros({in, out}, vals.options());
  T* w = const_cast<T*>(ptr<T>(wt));
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
  const T* v = ptr<T>(vals);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  at::parallel_for(0, in, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* src = v + rp[i];
      for (int64_t c = 0; c < chunks; ++c) {
        uint32_t mk = m[i * chunks + c];
        while (mk) {
          const int bit = __builtin_ctz(mk);
          w[i * out + 16 * c + bit] = *src++;
          mk &= mk - 1;
        }
      }
    }
  });
  return wt;
}

// ---------------------------------------------------------------- dispatch on dtype
void check_vec(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, name,
              " must be float32 or bfloat16");
}

void check_thr(const torch::Tensor& thr, int64_t n) {
  TORCH_CHECK(thr.scalar_type() == torch::kFloat32 && thr.is_contiguous() && (thr.numel() == 1 || thr.numel() == n),
              "threshold must be a float32 tensor of 1 or ", n, " entries");
}

// ---------------------------------------------------------------- tiles of W^T for prefill
// Prefill multiplies many tokens by the weight: a dense matmul, on the weight unpacked one tile of
// `tw` output columns at a time into a small buffer that stays in cache (so unpacking never costs a
// trip to memory). tile_offsets[i, t] = values of row i before tile t.
torch::Tensor tile_offsets(const torch::Tensor& masks, int64_t tile_chunks) {
  const int64_t in = masks.size(0), chunks = masks.size(1), tiles = (chunks + tile_chunks - 1) / tile_chunks;
  auto off = torch::empty({in, tiles}, torch::kInt32);
  int32_t* o = off.data_ptr<int32_t>();
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
  at::parallel_for(0, in, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int32_t n = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        if (c % tile_chunks == 0) o[i * tiles + c / tile_chunks] = n;
        n += __builtin_popcount(m[i * chunks + c]);
      }
    }
  });
  return off;
}

template <typename T>
void unpack_tile_portable(const uint16_t* m, const T* src, int64_t c0, int64_t c1, T* dst) {
  for (int64_t c = c0; c < c1; ++c) {
    uint32_t mk = m[c];
    T* d = dst + 16 * (c - c0);
    for (int b = 0; b < 16; ++b) d[b] = T(0);
    while (mk) {
      const int b = __builtin_ctz(mk);
      d[b] = *src++;
      mk &= mk - 1;
    }
  }
}

#if PK_X86
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
void unpack_tile_avx512(const uint16_t* m, const float* src, int64_t c0, int64_t c1, float* dst) {
  for (int64_t c = c0; c < c1; ++c) {
    const __mmask16 mk = static_cast<__mmask16>(m[c]);
    _mm512_storeu_ps(dst + 16 * (c - c0), _mm512_maskz_expand_ps(mk, _mm512_loadu_ps(src)));
    src += __builtin_popcount(m[c]);
  }
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))
void unpack_tile_avx512(const uint16_t* m, const uint16_t* src, int64_t c0, int64_t c1, uint16_t* dst) {
  for (int64_t c = c0; c < c1; ++c) {
    const __mmask16 mk = static_cast<__mmask16>(m[c]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * (c - c0)),
                        _mm256_maskz_expand_epi16(mk, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
    src += __builtin_popcount(m[c]);
  }
}
#endif

template <typename T>
void unpack_tile_impl(const torch::Tensor& masks, const torch::Tensor& vals, const torch::Tensor& rowptr,
                      const torch::Tensor& offsets, int64_t tile, int64_t tile_chunks, torch::Tensor& buf) {
  const int64_t in = masks.size(0), chunks = masks.size(1), tiles = offsets.size(1);
  const int64_t c0 = tile * tile_chunks, c1 = std::min(chunks, c0 + tile_chunks), width = buf.size(1);
  const uint16_t* m = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
  const T* v = ptr<T>(vals);
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  T* dst = const_cast<T*>(ptr<T>(buf));
  const bool wide = isa() == 1;
  at::parallel_for(0, in, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* src = v + rp[i] + off[i * tiles + tile];
#if PK_X86
      if (wide) {
        unpack_tile_avx512(m + i * chunks, src, c0, c1, dst + i * width);
        continue;
      }
#endif
      unpack_tile_portable<T>(m + i * chunks, src, c0, c1, dst + i * width);
    }
  });
}

void unpack_tile(torch::Tensor masks, torch::Tensor vals, torch::Tensor rowptr, torch::Tensor offsets, int64_t tile,
                 int64_t tile_chunks, torch::Tensor buf) {
  check_vec(vals, "vals");
  TORCH_CHECK(buf.scalar_type() == vals.scalar_type() && buf.is_contiguous() && buf.size(0) == masks.size(0) &&
              buf.size(1) == 16 * tile_chunks && offsets.scalar_type() == torch::kInt32, "tile buffer mismatch");
  TORCH_CHECK(tile >= 0 && tile < offsets.size(1), "tile out of range");
  if (vals.scalar_type() == torch::kFloat32) unpack_tile_impl<float>(masks, vals, rowptr, offsets, tile, tile_chunks, buf);
  else unpack_tile_impl<uint16_t>(masks, vals, rowptr, offsets, tile, tile_chunks, buf);
}

#define PK_DISPATCH(x, fn, ...) \
  ((x).scalar_type() == torch::kFloat32 ? fn<float>(__VA_ARGS__) : fn<uint16_t>(__VA_ARGS__))

torch::Tensor gemv_t(torch::Tensor x, torch::Tensor wt, torch::Tensor thr, c10::optional<torch::Tensor> bias,
                     c10::optional<torch::Tensor> stats) {
  check_vec(x, "x");
  check_vec(wt, "wt");
  TORCH_CHECK(wt.dim() == 2 && x.numel() == wt.size(0) && wt.scalar_type() == x.scalar_type(), "shape/dtype mismatch");
  check_thr(thr, wt.size(0));
  return PK_DISPATCH(x, gemv_t_impl, x, wt, thr, bias, stats);
}

torch::Tensor gemv_bitmask(torch::Tensor x, torch::Tensor masks, torch::Tensor vals, torch::Tensor rowptr,
                           int64_t out, torch::Tensor thr, c10::optional<torch::Tensor> bias,
                           c10::optional<torch::Tensor> stats) {
  check_vec(x, "x");
  TORCH_CHECK(masks.dim() == 2 && masks.size(0) == x.numel() && masks.size(1) * 16 >= out, "mask shape mismatch");
  TORCH_CHECK(vals.scalar_type() == x.scalar_type() && rowptr.numel() == x.numel() + 1, "values/rowptr mismatch");
  TORCH_CHECK(vals.numel() >= rowptr[-1].item<int64_t>() + 16, "bitmask values must be padded by 16 entries");
  check_thr(thr, x.numel());
  return PK_DISPATCH(x, gemv_bitmask_impl, x, masks, vals, rowptr, out, thr, bias, stats);
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

std::vector<torch::Tensor> pack_bitmask(torch::Tensor wt) {
  check_vec(wt, "wt");
  return PK_DISPATCH(wt, pack_bitmask_impl, wt);
}

torch::Tensor unpack_bitmask(torch::Tensor masks, torch::Tensor vals, torch::Tensor rowptr, int64_t out) {
  check_vec(vals, "vals");
  return PK_DISPATCH(vals, unpack_bitmask_impl, masks, vals, rowptr, out);
}

int64_t get_isa() { return isa(); }
void set_isa(int64_t v) {
  TORCH_CHECK(v == 0 || v == 1 || v == -1, "isa must be -1 (detect), 0 (portable) or 1 (avx512)");
  if (v == 1) {
    g_isa = -1;
    TORCH_CHECK(isa() == 1, "this CPU lacks AVX-512 F/BW/VL/VBMI2");
  }
  g_isa = v;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_t", &gemv_t, "activation-sparse GEMV on input-major weights");
  m.def("gemv_bitmask", &gemv_bitmask, "bitmask weight-sparse (and activation-sparse) GEMV");
  m.def("gemv_csr16", &gemv_csr16, "CSR GEMV with 16-bit column indices");
  m.def("sparse_ffn", &sparse_ffn, "gated MLP with a thresholded activation");
  m.def("pack_bitmask", &pack_bitmask, "pack input-major weights into masks, values, row pointers");
  m.def("unpack_bitmask", &unpack_bitmask, "dense input-major weights from the bitmask format");
  m.def("tile_offsets", &tile_offsets, "values before each tile of each row of a bitmask");
  m.def("unpack_tile", &unpack_tile, "one tile of output columns of a bitmask W^T, dense, into a buffer");
  m.def("get_isa", &get_isa, "0: portable path, 1: AVX-512 path");
  m.def("set_isa", &set_isa, "-1: detect, 0: force the portable path, 1: AVX-512 path");
}
