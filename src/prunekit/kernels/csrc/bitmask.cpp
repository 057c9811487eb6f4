// The tiled bitmask format of an input-major weight W^T [in, out] (weight sparsity), its GEMV and
// the unpacking that prefill uses (prunekit.kernels.ops.BitmaskT is the Python side); AVX-512, AVX2 and
// portable paths.
//
// Outputs are cut into tiles of 128 (8 chunks of 16). For each tile t and input row i: 8 16-bit
// masks (bit b of chunk c: output 128 t + 16 c + b is non-zero) and the row's non-zeros of that
// tile, packed. Storage is tile-major: masks [tiles, in, 8], values tile by tile and row by row,
// offsets [tiles, in + 1] (int32: values of tile t before row i) and base [tiles + 1] (int64:
// values before tile t). The GEMV gives each thread whole tiles: it holds the tile's 128 outputs
// in registers while it walks the active rows, reading each tile's masks and values as one
// forward stream, never loading or storing an accumulator in memory; each output is summed by
// one thread in row order, so results do not depend on the thread count.
#include "common.h"

namespace pk {
namespace {

constexpr int64_t CHUNKS = 8, TILE = 128;
constexpr int64_t PAD = 32;  // values of padding: the vector loads may read 31 values past a segment

template <typename T>
void tile_portable(const uint16_t* M, const T* V, const int32_t* O, const int32_t* idx, const float* xa, int64_t nact,
                   float* y) {
  for (int64_t j = 0; j < TILE; ++j) y[j] = 0.0f;
  for (int64_t k = 0; k < nact; ++k) {
    const int64_t i = idx[k];
    const float a = xa[k];
    const uint16_t* m = M + i * CHUNKS;
    const T* v = V + O[i];
    for (int64_t c = 0; c < CHUNKS; ++c) {
      uint32_t mk = m[c];
      while (mk) {
        y[16 * c + __builtin_ctz(mk)] += a * tof(*v++);
        mk &= mk - 1;
      }
    }
  }
}

#if PK_X86
#define PK_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))

// With zero activations skipped, a tile's segments are read with gaps the hardware prefetcher
// does not follow: fetch the masks and values of the row AHEAD active rows on.
constexpr int64_t AHEAD = 32;
template <typename T>
inline void prefetch_row(const uint16_t* M, const T* V, const int32_t* O, int64_t i) {
  _mm_prefetch(reinterpret_cast<const char*>(M + i * CHUNKS), _MM_HINT_T0);
  const uintptr_t end = reinterpret_cast<uintptr_t>(V + O[i + 1]);
  for (uintptr_t a = reinterpret_cast<uintptr_t>(V + O[i]) & ~uintptr_t(63); a < end; a += 64)
    _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
}

// float32: one register-form expand per chunk (the memory form is microcoded on AMD Zen 4); the
// offsets of the 8 chunks come from popcounts of prefixes of the two 64-bit mask words, so no
// chunk waits on the one before it.
PK_TARGET void tile_avx512(const uint16_t* M, const float* V, const int32_t* O, const int32_t* idx, const float* xa,
                           int64_t nact, bool gaps, float* y) {
  __m512 acc[CHUNKS];
  for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < nact; ++k) {
    const int64_t i = idx[k];
    if (gaps && k + AHEAD < nact) prefetch_row(M, V, O, idx[k + AHEAD]);
    uint64_t w[2];
    std::memcpy(w, M + i * CHUNKS, 16);
    const float* v = V + O[i];
    const __m512 a = _mm512_set1_ps(xa[k]);
    const int n0 = __builtin_popcountll(w[0]);
    const int p[CHUNKS] = {0, __builtin_popcountll(w[0] & 0xFFFFull), __builtin_popcountll(w[0] & 0xFFFFFFFFull),
                           __builtin_popcountll(w[0] & 0xFFFFFFFFFFFFull), n0,
                           n0 + __builtin_popcountll(w[1] & 0xFFFFull), n0 + __builtin_popcountll(w[1] & 0xFFFFFFFFull),
                           n0 + __builtin_popcountll(w[1] & 0xFFFFFFFFFFFFull)};
#pragma GCC unroll 8
    for (int c = 0; c < CHUNKS; ++c) {
      const __mmask16 mk = static_cast<__mmask16>(w[c / 4] >> (16 * (c % 4)));
      acc[c] = _mm512_fmadd_ps(a, _mm512_maskz_expand_ps(mk, _mm512_loadu_ps(v + p[c])), acc[c]);
    }
  }
  for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(y + 16 * c, acc[c]);
}

// bfloat16: one expand places two chunks (32 values); interleaving zeros below each value widens
// it to float32 (unpacklo/hi within 128-bit lanes), which permutes outputs inside each pair of
// chunks: lo holds outputs 8l..8l+3 of lane l, hi 8l+4..8l+7, put back in order at the end.
PK_TARGET void tile_avx512(const uint16_t* M, const uint16_t* V, const int32_t* O, const int32_t* idx,
                           const float* xa, int64_t nact, bool gaps, float* y) {
  __m512 lo[4], hi[4];
  for (int c = 0; c < 4; ++c) lo[c] = hi[c] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k = 0; k < nact; ++k) {
    const int64_t i = idx[k];
    if (gaps && k + AHEAD < nact) prefetch_row(M, V, O, idx[k + AHEAD]);
    uint64_t w[2];
    std::memcpy(w, M + i * CHUNKS, 16);
    const uint16_t* v = V + O[i];
    const __m512 a = _mm512_set1_ps(xa[k]);
    const int n0 = __builtin_popcountll(w[0]);
    const int p[4] = {0, __builtin_popcountll(w[0] & 0xFFFFFFFFull), n0,
                      n0 + __builtin_popcountll(w[1] & 0xFFFFFFFFull)};
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const __mmask32 mk = static_cast<__mmask32>(w[c / 2] >> (32 * (c % 2)));
      const __m512i e = _mm512_maskz_expand_epi16(mk, _mm512_loadu_si512(v + p[c]));
      lo[c] = _mm512_fmadd_ps(a, _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, e)), lo[c]);
      hi[c] = _mm512_fmadd_ps(a, _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, e)), hi[c]);
    }
  }
  alignas(64) float l[16], h[16];
  for (int c = 0; c < 4; ++c) {
    _mm512_store_ps(l, lo[c]);
    _mm512_store_ps(h, hi[c]);
    for (int lane = 0; lane < 4; ++lane)
      for (int q = 0; q < 4; ++q) {
        y[32 * c + 8 * lane + q] = l[4 * lane + q];
        y[32 * c + 8 * lane + 4 + q] = h[4 * lane + q];
      }
  }
}

PK_TARGET void expand_row(const uint16_t* m, const float* src, float* dst) {
  for (int c = 0; c < CHUNKS; ++c) {
    _mm512_storeu_ps(dst + 16 * c, _mm512_maskz_expand_ps(static_cast<__mmask16>(m[c]), _mm512_loadu_ps(src)));
    src += __builtin_popcount(m[c]);
  }
}
PK_TARGET void expand_row(const uint16_t* m, const uint16_t* src, uint16_t* dst) {
  for (int c = 0; c < CHUNKS; ++c) {
    const __m256i e = _mm256_maskz_expand_epi16(static_cast<__mmask16>(m[c]),
                                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * c), e);
    src += __builtin_popcount(m[c]);
  }
}

// AVX2 (no expand instruction), 8 outputs per register, a 256-entry table per 8-bit mask. float32: a
// permute whose lane indices come from the table; the index of a lane whose bit is set carries the
// sign bit too (permutevar reads only the low 3 bits), so the same register blends the other lanes
// to zero. A tile's 128 outputs are 16 accumulators (all of AVX2's registers: the compiler spills a
// few, cheaper than walking the tile's rows twice, measured).
#define PK_TARGET2 __attribute__((target("avx2,fma,popcnt")))

// bfloat16 needs no permute: 8 packed values (16 bytes) broadcast to both 128-bit lanes, one byte shuffle
// (pshufb zeroes a byte whose index has its top bit set) puts value k in the top half of output j's 32-bit
// lane — widened to float32 and expanded at once (wide[m]); narrow[m] expands them as bfloat16, for prefill.
struct ExpandTable {
  alignas(32) int32_t sel[256][8];
  alignas(32) uint8_t wide[256][32];
  alignas(16) uint8_t narrow[256][16];
  ExpandTable() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0, k = 0; j < 8; ++j) {
        const bool on = m >> j & 1;
        sel[m][j] = on ? static_cast<int32_t>(static_cast<uint32_t>(k) | 0x80000000u) : 0;
        uint8_t* w = wide[m] + 16 * (j / 4) + 4 * (j % 4);
        w[0] = w[1] = 0x80;
        w[2] = on ? static_cast<uint8_t>(2 * k) : 0x80;
        w[3] = on ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        narrow[m][2 * j] = w[2];
        narrow[m][2 * j + 1] = w[3];
        k += on;
      }
  }
};
inline const ExpandTable& expand_table() {
  static const ExpandTable t;
  return t;
}

PK_TARGET2 inline __m256 expand8(__m256 packed, const int32_t* sel) {
  const __m256i s = _mm256_load_si256(reinterpret_cast<const __m256i*>(sel));
  return _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(packed, s), _mm256_castsi256_ps(s));
}

PK_TARGET2 inline __m256 expand8(const uint16_t* v, const uint8_t* shuf) {
  const __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(src, _mm256_load_si256(reinterpret_cast<const __m256i*>(shuf))));
}
PK_TARGET2 inline __m256 expand8(const float* v, const ExpandTable& t, uint32_t m) { return expand8(_mm256_loadu_ps(v), t.sel[m]); }
PK_TARGET2 inline __m256 expand8(const uint16_t* v, const ExpandTable& t, uint32_t m) { return expand8(v, t.wide[m]); }

template <typename T>
PK_TARGET2 void tile_avx2(const uint16_t* M, const T* V, const int32_t* O, const int32_t* idx, const float* xa,
                          int64_t nact, bool gaps, float* y) {
  const ExpandTable& tab = expand_table();
  __m256 acc[16];
  for (int g = 0; g < 16; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t k = 0; k < nact; ++k) {
    const int64_t i = idx[k];
    if (gaps && k + AHEAD < nact) prefetch_row(M, V, O, idx[k + AHEAD]);
    uint64_t w[2];
    std::memcpy(w, M + i * CHUNKS, 16);
    const T* v = V + O[i];
    const T* v1 = v + __builtin_popcountll(w[0]);
    const __m256 a = _mm256_set1_ps(xa[k]);
#pragma GCC unroll 16
    for (int g = 0; g < 16; ++g) {  // group g: outputs 8g..8g+7, bits 8(g % 8).. of mask word g / 8
      const uint64_t bits = w[g / 8];
      const int shift = 8 * (g % 8);
      const int off = shift ? __builtin_popcountll(bits & ((uint64_t(1) << shift) - 1)) : 0;
      acc[g] = _mm256_fmadd_ps(a, expand8((g < 8 ? v : v1) + off, tab, (bits >> shift) & 0xFF), acc[g]);
    }
  }
  for (int g = 0; g < 16; ++g) _mm256_storeu_ps(y + 8 * g, acc[g]);
}

PK_TARGET2 void expand_row_avx2(const uint16_t* m, const float* src, float* dst) {
  const auto& tab = expand_table().sel;
  for (int c = 0; c < 2 * CHUNKS; ++c) {
    const uint32_t b = (m[c / 2] >> (8 * (c % 2))) & 0xFF;
    _mm256_storeu_ps(dst + 8 * c, expand8(_mm256_loadu_ps(src), tab[b]));
    src += __builtin_popcount(b);
  }
}
PK_TARGET2 void expand_row_avx2(const uint16_t* m, const uint16_t* src, uint16_t* dst) {
  const auto& tab = expand_table().narrow;
  for (int c = 0; c < 2 * CHUNKS; ++c) {
    const uint32_t b = (m[c / 2] >> (8 * (c % 2))) & 0xFF;
    const __m128i e = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)),
                                       _mm_load_si128(reinterpret_cast<const __m128i*>(tab[b])));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8 * c), e);
    src += __builtin_popcount(b);
  }
}
#endif

template <typename T>
void expand_row_portable(const uint16_t* m, const T* src, T* dst) {
  for (int c = 0; c < CHUNKS; ++c) {
    uint32_t mk = m[c];
    for (int b = 0; b < 16; ++b) dst[16 * c + b] = T(0);
    while (mk) {
      dst[16 * c + __builtin_ctz(mk)] = *src++;
      mk &= mk - 1;
    }
  }
}

struct View {  // raw pointers into the four tensors of a packed weight
  int64_t in, tiles;
  const uint16_t* masks;
  const int32_t* offsets;
  const int64_t* base;
  View(const torch::Tensor& m, const torch::Tensor& o, const torch::Tensor& b)
      : in(m.size(1)), tiles(m.size(0)), masks(reinterpret_cast<const uint16_t*>(m.data_ptr<int16_t>())),
        offsets(o.data_ptr<int32_t>()), base(b.data_ptr<int64_t>()) {}
  const uint16_t* tile_masks(int64_t t) const { return masks + t * in * CHUNKS; }
  const int32_t* tile_offsets(int64_t t) const { return offsets + t * (in + 1); }
};

template <typename T>
std::vector<torch::Tensor> pack_impl(const torch::Tensor& wt) {
  const int64_t in = wt.size(0), out = wt.size(1), tiles = (out + TILE - 1) / TILE;
  TORCH_CHECK(in * TILE < (int64_t(1) << 31), "bitmask tiles hold at most 2^31 values: ", in, " inputs is too many");
  const T* w = ptr<T>(wt);
  auto masks = torch::zeros({tiles, in, CHUNKS}, torch::kInt16);
  auto offsets = torch::empty({tiles, in + 1}, torch::kInt32);
  auto base = torch::empty({tiles + 1}, torch::kInt64);
  uint16_t* m = reinterpret_cast<uint16_t*>(masks.data_ptr<int16_t>());
  int32_t* o = offsets.data_ptr<int32_t>();
  int64_t* b = base.data_ptr<int64_t>();
  at::parallel_for(0, in, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t j = 0; j < out; ++j)
        if (tof(w[i * out + j]) != 0.0f)  // -0.0 counts as zero (unpacked as +0.0)
          m[((j / TILE) * in + i) * CHUNKS + (j % TILE) / 16] |= static_cast<uint16_t>(1u << (j % 16));
  });
  b[0] = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    int32_t* ot = o + t * (in + 1);
    ot[0] = 0;
    for (int64_t i = 0; i < in; ++i) {
      int32_t n = 0;
      for (int64_t c = 0; c < CHUNKS; ++c) n += __builtin_popcount(m[(t * in + i) * CHUNKS + c]);
      ot[i + 1] = ot[i] + n;
    }
    b[t + 1] = b[t] + ot[in];
  }
  auto vals = torch::zeros({b[tiles] + PAD}, wt.options());
  T* v = const_cast<T*>(ptr<T>(vals));
  at::parallel_for(0, in, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t t = 0; t < tiles; ++t) {
        T* dst = v + b[t] + o[t * (in + 1) + i];
        for (int64_t j = t * TILE; j < std::min(out, (t + 1) * TILE); ++j)
          if (tof(w[i * out + j]) != 0.0f) *dst++ = w[i * out + j];
      }
  });
  return {masks, vals, offsets, base};
}

// Rows [r0, r1) of tiles [t0, t1) into dst (row stride `width`, tile t at column 128 (t - t0)).
template <typename T>
void expand_rows(const View& p, const T* vals, int64_t t0, int64_t t1, int64_t r0, int64_t r1, T* dst, int64_t width) {
  const int level = isa();
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* m = p.tile_masks(t) + i * CHUNKS;
      const T* src = vals + p.base[t] + p.tile_offsets(t)[i];
      T* d = dst + i * width + (t - t0) * TILE;
#if PK_X86
      if (level == 1) {
        expand_row(m, src, d);
        continue;
      }
      if (level == 2) {
        expand_row_avx2(m, src, d);
        continue;
      }
#endif
      expand_row_portable<T>(m, src, d);
    }
}

// Tiles [t0, t1) of W^T, dense, into buf [in, 128 (t1 - t0)]: one parallel pass over the rows.
template <typename T>
void expand_tiles(const View& p, const torch::Tensor& vals, int64_t t0, int64_t t1, torch::Tensor& buf) {
  const T* v = ptr<T>(vals);
  T* d = const_cast<T*>(ptr<T>(buf));
  const int64_t width = buf.size(1);
  at::parallel_for(0, p.in, 16, [&](int64_t r0, int64_t r1) { expand_rows<T>(p, v, t0, t1, r0, r1, d, width); });
}

template <typename T>
torch::Tensor unpack_impl(const torch::Tensor& masks, const torch::Tensor& vals, const torch::Tensor& offsets,
                          const torch::Tensor& base, int64_t out) {
  const View p(masks, offsets, base);
  auto full = torch::empty({p.in, p.tiles * TILE}, vals.options());
  expand_tiles<T>(p, vals, 0, p.tiles, full);
  return full.narrow(1, 0, out).contiguous();
}

template <typename T>
torch::Tensor gemv_impl(const torch::Tensor& x, const torch::Tensor& masks, const torch::Tensor& vals,
                        const torch::Tensor& offsets, const torch::Tensor& base, int64_t out, const torch::Tensor& thr,
                        const c10::optional<torch::Tensor>& bias, const c10::optional<torch::Tensor>& stats) {
  const View p(masks, offsets, base);
  std::vector<int32_t> idx(p.in);
  std::vector<float> xa(p.in);
  const int64_t nact = active<T>(ptr<T>(x), p.in, thr.data_ptr<float>(), thr.numel() > 1, idx.data(), xa.data());
  if (stats.has_value()) {
    stats->data_ptr<int64_t>()[0] += nact;
    stats->data_ptr<int64_t>()[1] += p.in;
  }
  auto y = torch::empty({out}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  const T* v = ptr<T>(vals);
  const int level = isa();
  if (level == 2) expand_table();  // built once, before the threads
  at::parallel_for(0, p.tiles, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) float acc[TILE];
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* M = p.tile_masks(t);
      const T* V = v + p.base[t];
      const int32_t* O = p.tile_offsets(t);
#if PK_X86
      if (level == 1) tile_avx512(M, V, O, idx.data(), xa.data(), nact, nact < p.in, acc);
      else if (level == 2) tile_avx2<T>(M, V, O, idx.data(), xa.data(), nact, nact < p.in, acc);
      else
#endif
        tile_portable<T>(M, V, O, idx.data(), xa.data(), nact, acc);
      const int64_t n = std::min(TILE, out - t * TILE);
      std::memcpy(yp + t * TILE, acc, n * sizeof(float));
    }
  });
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat32));
  return y;
}

void check_packed(const torch::Tensor& masks, const torch::Tensor& vals, const torch::Tensor& offsets,
                  const torch::Tensor& base, int64_t out) {
  check_vec(vals, "vals");
  TORCH_CHECK(masks.dim() == 3 && masks.size(2) == CHUNKS && masks.scalar_type() == torch::kInt16 &&
              masks.is_contiguous() && masks.size(0) * TILE >= out && (masks.size(0) - 1) * TILE < out,
              "bitmask masks must be int16 [ceil(out / 128), in, 8]");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt32 && offsets.is_contiguous() && offsets.dim() == 2 &&
              offsets.size(0) == masks.size(0) && offsets.size(1) == masks.size(1) + 1,
              "bitmask offsets must be int32 [tiles, in + 1]");
  TORCH_CHECK(base.scalar_type() == torch::kInt64 && base.is_contiguous() && base.numel() == masks.size(0) + 1,
              "bitmask base must be int64 [tiles + 1]");
  TORCH_CHECK(vals.numel() >= base[-1].item<int64_t>() + PAD, "bitmask values must be padded by ", PAD, " entries");
}

}  // namespace

std::vector<torch::Tensor> pack_bitmask(torch::Tensor wt) {
  check_vec(wt, "wt");
  TORCH_CHECK(wt.dim() == 2, "wt must be 2-D [in, out]");
  return PK_DISPATCH(wt, pack_impl, wt);
}

torch::Tensor unpack_bitmask(torch::Tensor masks, torch::Tensor vals, torch::Tensor offsets, torch::Tensor base,
                             int64_t out) {
  check_packed(masks, vals, offsets, base, out);
  return PK_DISPATCH(vals, unpack_impl, masks, vals, offsets, base, out);
}

torch::Tensor gemv_bitmask(torch::Tensor x, torch::Tensor masks, torch::Tensor vals, torch::Tensor offsets,
                           torch::Tensor base, int64_t out, torch::Tensor thr, c10::optional<torch::Tensor> bias,
                           c10::optional<torch::Tensor> stats) {
  check_vec(x, "x");
  check_packed(masks, vals, offsets, base, out);
  TORCH_CHECK(masks.size(1) == x.numel() && vals.scalar_type() == x.scalar_type(), "x does not match the bitmask");
  check_thr(thr, x.numel());
  return PK_DISPATCH(x, gemv_impl, x, masks, vals, offsets, base, out, thr, bias, stats);
}

// Prefill: tiles [t0, t1) of W^T, dense, into buf [in, 128 (t1 - t0)].
void unpack_tiles(torch::Tensor masks, torch::Tensor vals, torch::Tensor offsets, torch::Tensor base, int64_t t0,
                  int64_t t1, torch::Tensor buf) {
  check_packed(masks, vals, offsets, base, masks.size(0) * TILE);
  TORCH_CHECK(0 <= t0 && t0 < t1 && t1 <= masks.size(0), "tiles [", t0, ", ", t1, ") out of range");
  TORCH_CHECK(buf.scalar_type() == vals.scalar_type() && buf.is_contiguous() && buf.dim() == 2 &&
              buf.size(0) == masks.size(1) && buf.size(1) == TILE * (t1 - t0), "tile buffer mismatch");
  const View p(masks, offsets, base);
  PK_DISPATCH(vals, expand_tiles, p, vals, t0, t1, buf);
}

}  // namespace pk
