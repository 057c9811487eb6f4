// Shared helpers of the sparse decode kernels (prunekit.kernels): CPU dispatch, bfloat16 widening,
// the active-input list, argument checks, and the declarations of the bitmask-format kernels
// (bitmask.cpp) that sparse_gemv.cpp binds.
#pragma once
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

namespace pk {

// -1 undetected, 0 portable, 1 avx512, 2 avx2 + fma (one variable for every file). Only the bitmask
// kernels have an AVX2 path (the others' portable loops vectorise for the compiling CPU).
inline int g_isa = -1;

inline bool has_avx512() {
#if PK_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}

inline bool has_avx2() {
#if PK_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline int isa() {
  if (g_isa < 0) g_isa = has_avx512() ? 1 : has_avx2() ? 2 : 0;
  return g_isa;
}

inline float tof(float v) { return v; }
inline float tof(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline const T* ptr(const torch::Tensor& t);
template <> inline const float* ptr<float>(const torch::Tensor& t) { return t.data_ptr<float>(); }
template <> inline const uint16_t* ptr<uint16_t>(const torch::Tensor& t) {
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

inline void check_vec(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), name, " must be a contiguous CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, name,
              " must be float32 or bfloat16");
}

inline void check_thr(const torch::Tensor& thr, int64_t n) {
  TORCH_CHECK(thr.scalar_type() == torch::kFloat32 && thr.is_contiguous() && (thr.numel() == 1 || thr.numel() == n),
              "threshold must be a float32 tensor of 1 or ", n, " entries");
}

#define PK_DISPATCH(x, fn, ...) \
  ((x).scalar_type() == torch::kFloat32 ? fn<float>(__VA_ARGS__) : fn<uint16_t>(__VA_ARGS__))

// bitmask.cpp: the tiled bitmask format of an input-major weight W^T [in, out]
std::vector<torch::Tensor> pack_bitmask(torch::Tensor wt);
torch::Tensor unpack_bitmask(torch::Tensor masks, torch::Tensor vals, torch::Tensor offsets, torch::Tensor base,
                             int64_t out);
torch::Tensor gemv_bitmask(torch::Tensor x, torch::Tensor masks, torch::Tensor vals, torch::Tensor offsets,
                           torch::Tensor base, int64_t out, torch::Tensor thr, c10::optional<torch::Tensor> bias,
                           c10::optional<torch::Tensor> stats);
void unpack_tiles(torch::Tensor masks, torch::Tensor vals, torch::Tensor offsets, torch::Tensor base, int64_t t0,
                  int64_t t1, torch::Tensor buf);

}  // namespace pk
