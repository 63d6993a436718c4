// Decode-time matrix-vector kernels for x86-64 with AVX-512 (BF16 + VNNI), built on first use by
// minicpmv/quant/native.py and registered as torch.ops.minicpmv_native.*.
//
// Every kernel computes y[M, N] = x[M, K] @ W[N, K]^T for a few rows of x (decoding: M is the batch),
// reading each block of weight rows from memory once for all M rows, split over rows of W with
// ATen's thread pool.
// * bf16_gemv: bf16 weights and activations, products summed in float32 (vdpbf16ps).
// * bf16_blocked_gemv: the same on a weight held in oneDNN's blocked layout (a PyTorch mkldnn
//   tensor), summed in the order of oneDNN's matmul for one row of x.
// * q8_gemv: int8 weights with one float32 scale per 16 weights of a row, or per row.
// * q8_0_gemv: int8 weights with one scale per 32 (GGUF's Q8_0), scales and values chunked per 16
//   groups (one stream per row).
// * q4_gemv: 4-bit weights in groups of 32-256, w = (q - 8) * s + z (q in 0..15; nibble pairs: even k
//   low, odd k high; z may be absent), quant/linear.py's int4 storage.
// * q4_0_gemv: symmetric 4-bit weights with one scale per 32 (GGUF's Q4_0), chunked the same way,
//   multiplied as llama.cpp multiplies them: activations as Q8_0 blocks (8 bits and a float16
//   scale per 32; vpdpbusd).
// * q4z_gemv: asymmetric 4-bit weights in groups of 32 (GGUF's Q4_K) chunked with their zeros:
//   q4_gemv's arithmetic, one stream per row.
// * q6k_gemv: GGML's Q6_K blocks read as stored (0.82 byte per weight), multiplied as llama.cpp
//   multiplies them: activations as Q8_K blocks (8 bits and a float32 scale per 256).
// * q4_dequant / q8_dequant / chunked_dequant / q6k_dequant: the whole weight, for prefill (where a
//   GEMM runs on it).
// The other integer kernels take activations as 16-bit fixed point per row (x = xq * 2^(e - 15) with
// |x| < 2^e), multiply-add them with vpdpwssd and scale each group's exact int32 partial sums in
// float32. This file does not choose when the kernels apply (quant/linear.py does).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__) || !defined(__AVX512BF16__)
#error "minicpmv native kernels need AVX-512 F, BW, VNNI and BF16"
#endif

namespace at::native {  // exported by libtorch_cpu but declared in no installed header; weak, so that
// a PyTorch without them still loads this library (bf16_blocked_gemv then refuses to run)
__attribute__((weak)) void* data_ptr_from_mkldnn(const at::Tensor& t);
__attribute__((weak)) int64_t nbytes_from_mkldnn(const at::Tensor& t);
}  // namespace at::native

namespace {

constexpr int64_t kGrain = 16;   // rows of W per task

// y[i, r] for every row r of W and row i of x, tasks of kGrain rows of W split over threads. Each
// dot reads R rows of W at once: dot(std::integral_constant<int, R>, r, i, out) writes
// out[j] = y[i, r + j] for j < R. Every row's arithmetic is the same whatever R, so results do not
// depend on where a task's rows fall.
template <int R, typename Dot>
void gemv_rows(int64_t n, int64_t m, float* y, const Dot& dot) {
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    float out[R];
    int64_t r = lo;
    for (; R > 1 && r + R <= hi; r += R)
      for (int64_t i = 0; i < m; ++i) {
        dot(std::integral_constant<int, R>{}, r, i, out);
        for (int j = 0; j < R; ++j) y[i * n + r + j] = out[j];
      }
    for (; r < hi; ++r)
      for (int64_t i = 0; i < m; ++i) dot(std::integral_constant<int, 1>{}, r, i, y + i * n + r);
  });
}

// Activation rows wider than this (in values) make rows of W share each activation load.
constexpr int64_t kShareAbove = 8192;

// gemv_rows with R = kBlock rows of W per dot where x's rows are wide (k > kShareAbove), else one.
// Sharing pays where the activations no longer stay in L1 beside the weight stream (down_proj:
// 37 KB of bf16, 24 KB as Q8_0); on narrower rows, interleaved row streams read slower from memory
// than one sequential stream on an AMD Zen 4 host (bf16 28 against 32-34 GB/s, Q4_0 21 against 40
// GB/s on [18944, 3584]), while on a Sapphire Rapids host they measured level from memory. The
// best kBlock is the kernel's (the most rows whose sums still fit the registers, or nearly):
// measured on [3584, 18944] from memory on Zen 4 (bench/RESULTS.md, "2026-12-07 (06:02-08:20 UTC)").
template <int kBlock, typename Dot>
void gemv_row_blocks(int64_t n, int64_t m, int64_t k, float* y, const Dot& dot) {
  if (k > kShareAbove) gemv_rows<kBlock>(n, m, y, dot);
  else gemv_rows<1>(n, m, y, dot);
}

// Rows per shared activation load on wide rows, per kernel (see gemv_row_blocks).
constexpr int kBf16Rows = 4, kInt8GroupRows = 8, kInt4GroupRows = 8, kChunkedRows = 12, kChannelRows = 12;

float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// The first min(n, 16) of 16 lanes (loads and stores at the end of a row).
__mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u); }

// One row of activations as 16-bit fixed point: returns the step 2^(e - 15).
float to_fixed(const float* x, int64_t k, int16_t* out) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mk = first_lanes(k - i);
    const __m512 v = _mm512_maskz_loadu_ps(mk, x + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  if (amax == 0.f || nan || !std::isfinite(amax)) {  // all zero; or NaN / inf, which the result carries
    std::memset(out, 0, k * sizeof(int16_t));
    return amax == 0.f && !nan ? 0.f : NAN;
  }
  int e;
  std::frexp(amax, &e);  // amax < 2^e
  const float step = std::ldexp(1.f, e - 15);
  const __m512 inv = _mm512_set1_ps(1.f / step), lim = _mm512_set1_ps(32767.f);  // a power of two: exact
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mk = first_lanes(k - i);
    __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), inv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // ties to even
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
    _mm256_mask_storeu_epi16(out + i, mk, _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(q)));
  }
  return step;
}

// The rows of x [M, K] as 16-bit fixed point: q [M, K] and one step per row.
struct FixedRows {
  std::vector<int16_t> q;
  std::vector<float> step;
};

FixedRows fixed_rows(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  const auto xf = x.to(at::kFloat).contiguous();
  FixedRows f{std::vector<int16_t>(m * k), std::vector<float>(m)};
  for (int64_t i = 0; i < m; ++i) f.step[i] = to_fixed(xf.data_ptr<float>() + i * k, k, f.q.data() + i * k);
  return f;
}

// Sums of each `group` consecutive fixed-point values of a row (exact: |sum| < 2^24), times `scale`.
void group_sums(const int16_t* q, int64_t k, int64_t group, float scale, float* out) {
  for (int64_t g = 0; g < k / group; ++g) {
    int32_t acc = 0;
    for (int64_t j = 0; j < group; ++j) acc += q[g * group + j];
    out[g] = static_cast<float>(acc) * scale;
  }
}

// x [M, K], contiguous: every kernel checks it before it reads x's sizes.
void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), name, ": expects x [M, K], contiguous");
}

// A contiguous 2-D weight of k_per_row columns (k_per_row derived from x, checked before).
void check_rows(const at::Tensor& w, int64_t k_per_row, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), name, ": expects a contiguous 2-D weight");
  TORCH_CHECK(w.size(1) == k_per_row, name, ": weight has ", w.size(1), " columns, expected ", k_per_row);
}

// Scales as float32 or float16 (float16 where that is exact, e.g. GGUF's Q4_0 / Q8_0 block scales).
struct Scales {
  const float* f32 = nullptr;
  const uint16_t* f16 = nullptr;
  float operator[](int64_t i) const { return f32 ? f32[i] : _cvtsh_ss(f16[i]); }
  Scales row(int64_t r, int64_t len) const { return f32 ? Scales{f32 + r * len, nullptr} : Scales{nullptr, f16 + r * len}; }
  template <int R>
  std::array<Scales, R> rows(int64_t r, int64_t len) const {  // rows r .. r + R - 1
    std::array<Scales, R> out;
    for (int j = 0; j < R; ++j) out[j] = row(r + j, len);
    return out;
  }
};

Scales scales_of(const at::Tensor& s, const char* name) {
  TORCH_CHECK(s.is_contiguous() && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kHalf),
              name, ": scales must be contiguous float32 or float16");
  if (s.scalar_type() == at::kFloat) return Scales{s.data_ptr<float>(), nullptr};
  return Scales{nullptr, reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>())};
}

// R rows of bf16 weights (`stride` elements apart) against one bf16 row x: out[r] = sum_k w_rk x_k,
// each row summed in two float32 chains (alternate 32-wide chunks; the tail in the first), an
// order that gives PyTorch's bf16 linear bit for bit on the small layers of the recorded
// checkpoints (large ones PyTorch sums in oneDNN's order: bf16_blocked_gemv).
template <int R>
void dot_bf16(const uint16_t* w, int64_t stride, const uint16_t* x, int64_t k, float* out) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  auto at = [&](int r, int64_t i) { return (__m512bh)_mm512_loadu_si512(w + r * stride + i); };
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + i), x1 = (__m512bh)_mm512_loadu_si512(x + i + 32);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_dpbf16_ps(a0[r], at(r, i), x0);
      a1[r] = _mm512_dpbf16_ps(a1[r], at(r, i + 32), x1);
    }
  }
  for (; i < k; i += 32) {
    const __mmask32 m = k - i >= 32 ? 0xFFFFFFFFu : ((1u << (k - i)) - 1u);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + i);
    for (int r = 0; r < R; ++r)
      a0[r] = _mm512_dpbf16_ps(a0[r], (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * stride + i), xv);
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm512_add_ps(a0[r], a1[r]));
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) {
  check_x(x, "bf16_gemv");
  check_rows(w, x.size(1), "bf16_gemv");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_gemv: expects bf16");
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  gemv_row_blocks<kBf16Rows>(n, m, k, yp, [&](auto rows, int64_t r, int64_t i, float* out) {
    dot_bf16<decltype(rows)::value>(wp + r * k, k, xp + i * k, k, out);
  });
  return y;
}

// Rows "chunked" for the Q8_0, Q4_0 and Q4_K kernels (quant/linear.py's chunk_rows): per 16 groups
// of 32 weights, their 16 scales (float16 or float32, S; Q4_K: then their 16 zeros, same type),
// then their B bytes each (int8: 32, nibble pairs: 16); a row's last chunk holds its `left` groups
// the same way. One stream per row: scales (and zeros) and values in separate arrays read 1.4x
// (Q4_0), 1.25x (Q8_0) and 1.24x (Q4_K) slower on [18944, 3584] from memory on an AMD Zen 4 host.
// Bytes of `groups` groups of a chunked row: B bytes of values and H floats of type S each.
template <typename S, int64_t B, int64_t H = 1>
constexpr int64_t chunked_bytes(int64_t groups) { return groups * (B + H * static_cast<int64_t>(sizeof(S))); }

// Checks chunked rows of K weights (`b` bytes of values and `h` float values - scales, zeros - a
// group) and tells the float type apart by the row length: true for float16, false for float32.
bool chunked_half(const at::Tensor& rows, int64_t k, int64_t b, const char* name, int64_t h = 1) {
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.scalar_type() == at::kByte && k % 32 == 0, name,
              ": expects uint8 rows [N, bytes] and K % 32 == 0");
  const int64_t groups = k / 32, stride = rows.size(1);
  TORCH_CHECK(stride == groups * (b + 2 * h) || stride == groups * (b + 4 * h), name, ": rows of ", stride,
              " bytes for K = ", k);
  return stride == groups * (b + 2 * h);
}

// Scale j of a chunk, as float32.
template <typename S>
inline float chunk_scale(const uint8_t* chunk, int64_t j) {
  S v;
  std::memcpy(&v, chunk + j * static_cast<int64_t>(sizeof(S)), sizeof(S));
  if constexpr (sizeof(S) == 2) return _cvtsh_ss(v);
  else return v;
}

// The first 16 floats of type S at `at` (mask: which lanes exist), as float32: a chunk's scales
// or zeros.
template <typename S>
__m512 chunk_floats(const uint8_t* at, __mmask16 mk) {
  if constexpr (sizeof(S) == 2) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, at));
  else return _mm512_maskz_loadu_ps(mk, at);
}

// int8 row r of a block of R (`stride` weights apart) as 16-bit values: the 32 weights from `at`.
inline __m512i int8_at(const int8_t* w, int64_t stride, int r, int64_t at) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * stride + at)));
}

// R rows against fixed-point activations x, one scale per group of 16 weights:
// out[r] = sum_g s_rg * sum_{k in g} w_rk x_k.
template <int R>
void dot_q8_g16(const int8_t* w, int64_t stride, const int16_t* x, const Scales* s, int64_t groups, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {  // 32 weights: lanes 0-7 group g, lanes 8-15 group g + 1
    const __m512i xv = _mm512_loadu_si512(x + g * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), int8_at(w, stride, r, g * 16), xv);
      const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s[r][g]), _mm256_set1_ps(s[r][g + 1]), 1);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sv, acc[r]);
    }
  }
  if (g < groups) {
    const __m512i xv = _mm512_maskz_loadu_epi16(0xFFFFu, x + g * 16);
    for (int r = 0; r < R; ++r) {
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * stride + g * 16))));
      const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv, xv);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(s[r][g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// Q8_0: R chunked rows (`stride` bytes apart) of int8 weights, one scale per 32, against
// fixed-point activations x: two sums per row (even / odd groups).
template <int R, typename S>
void dot_q8_g32(const uint8_t* w, int64_t stride, const int16_t* x, int64_t groups, float* out) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t left = std::min<int64_t>(16, groups - g0);
    const uint8_t* chunk = w + chunked_bytes<S, 32>(g0);  // row 0's chunk
    const auto* q = reinterpret_cast<const int8_t*>(chunk + left * static_cast<int64_t>(sizeof(S)));
    int64_t j = 0;
    for (; j + 2 <= left; j += 2) {
      const int64_t at = (g0 + j) * 32;
      const __m512i x0 = _mm512_loadu_si512(x + at), x1 = _mm512_loadu_si512(x + at + 32);
      for (int r = 0; r < R; ++r) {
        const __m512i p0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), int8_at(q, stride, r, j * 32), x0);
        const __m512i p1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), int8_at(q, stride, r, j * 32 + 32), x1);
        a0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(chunk_scale<S>(chunk + r * stride, j)), a0[r]);
        a1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_set1_ps(chunk_scale<S>(chunk + r * stride, j + 1)),
                                a1[r]);
      }
    }
    if (j < left) {
      const __m512i x0 = _mm512_loadu_si512(x + (g0 + j) * 32);
      for (int r = 0; r < R; ++r) {
        const __m512i p0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), int8_at(q, stride, r, j * 32), x0);
        a0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(chunk_scale<S>(chunk + r * stride, j)), a0[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm512_add_ps(a0[r], a1[r]));
}

// Per output channel (one scale per row, applied by the caller): exact int32 sums of 32 products
// each, added in float32.
template <int R>
void dot_q8_row(const int8_t* w, int64_t stride, const int16_t* x, int64_t k, float* out) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  auto part = [&](int r, int64_t i, __m512i xv) {
    return _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), int8_at(w, stride, r, i), xv));
  };
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    const __m512i x0 = _mm512_loadu_si512(x + i), x1 = _mm512_loadu_si512(x + i + 32);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_add_ps(a0[r], part(r, i, x0));
      a1[r] = _mm512_add_ps(a1[r], part(r, i + 32, x1));
    }
  }
  for (; i < k; i += 32) {
    const __m512i x0 = _mm512_loadu_si512(x + i);
    for (int r = 0; r < R; ++r) a0[r] = _mm512_add_ps(a0[r], part(r, i, x0));
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm512_add_ps(a0[r], a1[r]));
}

at::Tensor q8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group) {
  check_x(x, "q8_gemv");
  if (group == 0) {  // per output channel: s is [N]
    check_rows(q, x.size(1), "q8_gemv");
    const int64_t m = x.size(0), n = q.size(0), k = x.size(1);
    TORCH_CHECK(k % 32 == 0 && q.scalar_type() == at::kChar && s.dim() == 1 && s.size(0) == n,
                "q8_gemv: per-channel int8 needs K % 32 == 0, int8 weights and [N] scales");
    const Scales sc = scales_of(s, "q8_gemv");
    const FixedRows xq = fixed_rows(x);
    auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
    const int8_t* qp = q.data_ptr<int8_t>();
    float* yp = y.data_ptr<float>();
    gemv_row_blocks<kChannelRows>(n, m, k, yp, [&](auto rows, int64_t r, int64_t i, float* out) {
      constexpr int R = decltype(rows)::value;
      dot_q8_row<R>(qp + r * k, k, xq.q.data() + i * k, k, out);
      for (int j = 0; j < R; ++j) out[j] *= sc[r + j] * xq.step[i];
    });
    return y;
  }
  TORCH_CHECK(group == 16, "q8_gemv: group must be 16 (0: per channel; groups of 32: q8_0_gemv)");
  check_rows(q, x.size(1), "q8_gemv");
  const int64_t m = x.size(0), n = q.size(0), k = x.size(1), groups = k / group;
  TORCH_CHECK(k % group == 0 && s.is_contiguous() && s.size(0) == n && s.size(1) == groups, "q8_gemv: bad shapes");
  TORCH_CHECK(q.scalar_type() == at::kChar, "q8_gemv: expects int8 weights");
  const Scales sc = scales_of(s, "q8_gemv");
  const FixedRows xq = fixed_rows(x);
  const std::vector<float>& step = xq.step;
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const int8_t* qp = q.data_ptr<int8_t>();
  const int16_t* xp = xq.q.data();
  float* yp = y.data_ptr<float>();
  gemv_row_blocks<kInt8GroupRows>(n, m, k, yp, [&](auto rows, int64_t r, int64_t i, float* out) {
    constexpr int R = decltype(rows)::value;
    const auto sr = sc.rows<R>(r, groups);
    dot_q8_g16<R>(qp + r * k, k, xp + i * k, sr.data(), groups, out);
  });
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) yp[i * n + r] *= step[i];
  return y;
}

// x [M, K] and chunked rows checked before either is read; returns chunked_half's answer.
bool check_chunked(const at::Tensor& x, const at::Tensor& rows, int64_t b, const char* name, int64_t h = 1) {
  check_x(x, name);
  return chunked_half(rows, x.size(1), b, name, h);
}

// y[M, N] of chunked rows (checked by check_chunked, `half` its answer): dot(R, S, row r's bytes,
// stride, i, out) for each block of R rows and row i of x, S the scale type (float16 as uint16_t,
// or float).
template <typename Dot>
at::Tensor chunked_gemv(const at::Tensor& x, const at::Tensor& rows, bool half, const Dot& dot) {
  const int64_t m = x.size(0), k = x.size(1), n = rows.size(0), stride = rows.size(1);
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const uint8_t* bp = rows.data_ptr<uint8_t>();
  gemv_row_blocks<kChunkedRows>(n, m, k, y.data_ptr<float>(), [&](auto r_, int64_t r, int64_t i, float* out) {
    if (half) dot(r_, uint16_t{}, bp + r * stride, stride, i, out);
    else dot(r_, float{}, bp + r * stride, stride, i, out);
  });
  return y;
}

// y[M, N] for Q8_0 chunked rows [N, K/32 * (32 + 2 or 4)], activations as 16-bit fixed point.
at::Tensor q8_0_gemv(const at::Tensor& x, const at::Tensor& rows) {
  const bool half = check_chunked(x, rows, 32, "q8_0_gemv");
  const int64_t k = x.size(1);
  const FixedRows xq = fixed_rows(x);
  auto y = chunked_gemv(x, rows, half, [&](auto r_, auto s_, const uint8_t* w, int64_t stride, int64_t i,
                                                      float* out) {
    dot_q8_g32<decltype(r_)::value, decltype(s_)>(w, stride, xq.q.data() + i * k, k / 32, out);
  });
  float* yp = y.data_ptr<float>();
  const int64_t m = y.size(0), n = y.size(1);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) yp[i * n + r] *= xq.step[i];
  return y;
}

// 16 scales from g on (mask: which lanes exist), as float32.
__m512 load_scales(Scales s, int64_t g, __mmask16 mk) {
  if (s.f32) return _mm512_maskz_loadu_ps(mk, s.f32 + g);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, s.f16 + g));
}

// Products of 32 weight bytes (as 16-bit values: low nibble, high nibble) with the even / odd
// 16-bit activations, summed per 32-bit lane.
inline __m512i nibble_products(__m512i b, __m512i e, __m512i o) {
  const __m512i low = _mm512_set1_epi16(0x0F);
  return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b, low), e),
                             _mm512_srli_epi16(b, 4), o);
}

// R rows of 4-bit weights (`stride` bytes apart) against one row of activations: bytes b hold
// weights 2b (low nibble) and 2b + 1 (high); xe/xo are the even/odd activations, 16 of each per
// group of 32 weights. out[r] = sum_g s_rg * sum_k q_rk * x_k. The rows share every activation
// load: one row at a time reads 4 bytes of activations per byte of weights, which on a wide K
// (down_proj: 37 KB of activations) no longer stays in L1 beside the weight stream.
template <int R>
void dot_q4(const uint8_t* w, int64_t stride, const int16_t* xe, const int16_t* xo, const Scales* s, int64_t groups,
            int shift, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  // 32 bytes (64 weights, groups g and g + 1) of row r
  auto nibbles = [&](int r, int64_t g, __m512i e, __m512i o) {
    return nibble_products(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * stride + g * 16))), e, o);
  };
  // (groups of 32 on the native layers are chunked rows: dot_q4z, the same operations in this order)
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {  // lanes 0-7 group g, 8-15 group g + 1
    const __m512i e = _mm512_loadu_si512(xe + g * 16), o = _mm512_loadu_si512(xo + g * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s[r][g >> shift]), _mm256_set1_ps(s[r][(g + 1) >> shift]), 1);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(nibbles(r, g, e, o)), sv, acc[r]);
    }
  }
  if (g < groups) {  // the last group alone: 16 bytes
    const __m512i e = _mm512_maskz_loadu_epi16(0xFFFFu, xe + g * 16), o = _mm512_maskz_loadu_epi16(0xFFFFu, xo + g * 16);
    for (int r = 0; r < R; ++r) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * stride + g * 16));
      const __m512i p = nibble_products(_mm512_cvtepu8_epi16(_mm256_castsi128_si256(bytes)), e, o);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(s[r][g >> shift]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// sum_g (z_g - 8 s_g) * xsum_g: the offset part of w = (q - 8) * s + z (z absent: zero).
float offset_q4(Scales s, const float* z, const float* xs, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 eight = _mm512_set1_ps(8.f);
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mk = first_lanes(groups - g);
    const __m512 zv = z ? _mm512_maskz_loadu_ps(mk, z + g) : _mm512_setzero_ps();
    const __m512 c = _mm512_fnmadd_ps(eight, load_scales(s, g, mk), zv);  // z - 8 s
    acc = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(mk, xs + g), acc);
  }
  return hsum(acc);
}

// log2(group / 32) for a 4-bit weight of K columns with `groups` scales per row (group 32..256).
int q4_shift(int64_t k, int64_t groups, const char* name) {
  TORCH_CHECK(groups > 0 && k % groups == 0, name, ": scales do not divide the row");
  const int64_t group = k / groups;
  for (int shift = 0; shift <= 3; ++shift)
    if (group == (int64_t{32} << shift)) return shift;
  TORCH_CHECK(false, name, ": group size must be 32, 64, 128 or 256, got ", group);
  return 0;
}

// Activations as GGML's Q8_0 blocks, what llama.cpp multiplies Q4_0 weights with: per 32 values,
// d = amax / 127 kept as float16 and q = round(x * 127 / amax) (ties to even, as its x86 code
// rounds). even / odd: the block's even and odd k, 16 each (the nibble order of the weights);
// dsum: d times the sum of the block's q (the share of the weights' "- 8"). A block holding NaN
// or an infinity gets d = NaN, which the row's result then carries.
struct Q8Blocks {
  std::vector<int8_t> even, odd;  // [M, K/2]
  std::vector<float> d, dsum;     // [M, K/32]
};

Q8Blocks q8_0_blocks(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), groups = k / 32;
  const auto xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  Q8Blocks b{std::vector<int8_t>(m * k / 2), std::vector<int8_t>(m * k / 2), std::vector<float>(m * groups),
             std::vector<float>(m * groups)};
  const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  for (int64_t g = 0; g < m * groups; ++g) {
    const __m512 lo = _mm512_loadu_ps(xp + 32 * g), hi = _mm512_loadu_ps(xp + 32 * g + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const bool bad = _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q);
    if (bad || !std::isfinite(amax)) {
      b.d[g] = b.dsum[g] = NAN;  // even / odd stay zero
      continue;
    }
    const __m512 id = _mm512_set1_ps(amax != 0.f ? 127.f / amax : 0.f);
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(lo, id), kRound));
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(hi, id), kRound));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(b.even.data() + 16 * g), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(qlo, evens, qhi)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(b.odd.data() + 16 * g), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(qlo, odds, qhi)));
    b.d[g] = _cvtsh_ss(_cvtss_sh(amax / 127.f, _MM_FROUND_TO_NEAREST_INT));
    b.dsum[g] = b.d[g] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
  }
  return b;
}


// R chunked rows of Q4_0 (`stride` bytes apart) against one row of Q8_0 blocks:
// out[r] = sum_g s_rg d_g sum_k (q_rk - 8) xq_k. 64 bytes of nibbles (4 groups) per step: low and
// high nibbles times the even and odd activations with vpdpbusd (u8 x s8, 4 products per lane),
// alternate steps in two float32 sums (one sum's multiply-add latency bounded the loop); the "- 8"
// is one multiply-add per 16 groups with the scales already loaded: -8 sum_g s_rg dsum_g.
template <int R, typename S>
void dot_q4_q8(const uint8_t* w, int64_t stride, const int8_t* xe, const int8_t* xo, const float* xd, const float* xs,
               int64_t groups, float* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i pick[4];  // chunk c of 16 groups: lane j sums bytes 4j..4j+3, in group 4c + j / 4
  for (int c = 0; c < 4; ++c)
    pick[c] = _mm512_set_epi32(4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 2, 4 * c + 2, 4 * c + 2, 4 * c + 2,
                               4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c, 4 * c, 4 * c, 4 * c);
  __m512 acc[R][2], off[R];  // two sums of the products; sum of s_rg dsum_g
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = off[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const int64_t left = std::min<int64_t>(16, groups - g);
    const __mmask16 mk = first_lanes(left);
    const __m512 d16 = _mm512_maskz_loadu_ps(mk, xd + g);
    const __m512 ds16 = _mm512_maskz_loadu_ps(mk, xs + g);
    const uint8_t* chunk = w + chunked_bytes<S, 16>(g);                        // row 0's chunk
    const uint8_t* nib = chunk + left * static_cast<int64_t>(sizeof(S));  // its nibbles
    __m512 s16[R];
    for (int r = 0; r < R; ++r) {
      const __m512 sw = chunk_floats<S>(chunk + r * stride, mk);
      s16[r] = _mm512_mul_ps(sw, d16);
      off[r] = _mm512_fmadd_ps(sw, ds16, off[r]);
    }
    if (left == 16) {  // full chunks: no masks
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const int64_t at = (g + 4 * c) * 16;
        const __m512i e = _mm512_loadu_si512(xe + at), o = _mm512_loadu_si512(xo + at);
        for (int r = 0; r < R; ++r) {
          const __m512i b = _mm512_loadu_si512(nib + r * stride + 64 * c);
          __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b, low), e);
          p = _mm512_dpbusd_epi32(p, _mm512_and_si512(_mm512_srli_epi16(b, 4), low), o);
          acc[r][c & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(pick[c], s16[r]), acc[r][c & 1]);
        }
      }
      continue;
    }
    for (int c = 0; c < 4 && 4 * c < left; ++c) {  // the row's last, partial 16 groups
      const int64_t at = (g + 4 * c) * 16, n4 = std::min<int64_t>(4, left - 4 * c);
      const __mmask64 bm = n4 == 4 ? ~__mmask64{0} : (__mmask64{1} << (16 * n4)) - 1;
      const __m512i e = _mm512_maskz_loadu_epi8(bm, xe + at), o = _mm512_maskz_loadu_epi8(bm, xo + at);
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_maskz_loadu_epi8(bm, nib + r * stride + 64 * c);
        __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b, low), e);
        p = _mm512_dpbusd_epi32(p, _mm512_and_si512(_mm512_srli_epi16(b, 4), low), o);
        acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(pick[c], s16[r]), acc[r][0]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = hsum(_mm512_fmadd_ps(_mm512_set1_ps(-8.f), off[r], _mm512_add_ps(acc[r][0], acc[r][1])));
}

// y[M, N] for Q4_0 chunked rows [N, K/32 * (16 + 2 or 4)]: activations as Q8_0 blocks (llama.cpp's
// arithmetic).
at::Tensor q4_0_gemv(const at::Tensor& x, const at::Tensor& rows) {
  const bool half = check_chunked(x, rows, 16, "q4_0_gemv");
  const int64_t k = x.size(1), groups = k / 32;
  const Q8Blocks xb = q8_0_blocks(x);
  return chunked_gemv(x, rows, half, [&](auto r_, auto s_, const uint8_t* w, int64_t stride, int64_t i,
                                                    float* out) {
    const int64_t at = i * k / 2, ag = i * groups;
    dot_q4_q8<decltype(r_)::value, decltype(s_)>(w, stride, xb.even.data() + at, xb.odd.data() + at, xb.d.data() + ag,
                                                 xb.dsum.data() + ag, groups, out);
  });
}

// Activations for the 16-bit int4 kernels: fixed-point rows split into even / odd k [M, K/2] and
// per-group sums [M, G] of the same rounded values, so that the offset and the nibble sums share
// one rounding of x: the error is that of w = (q - 8) s + z, not of q s.
struct Q4Activations {
  FixedRows xq;
  std::vector<int16_t> xe, xo;
  std::vector<float> xsum;
};

Q4Activations q4_activations(const at::Tensor& x, int64_t groups) {
  const int64_t m = x.size(0), k = x.size(1);
  Q4Activations a{fixed_rows(x), std::vector<int16_t>(m * k / 2), std::vector<int16_t>(m * k / 2),
                  std::vector<float>(m * groups)};
  for (int64_t i = 0; i < m; ++i) {
    const int16_t* row = a.xq.q.data() + i * k;
    for (int64_t j = 0; j < k / 2; ++j) {
      a.xe[i * k / 2 + j] = row[2 * j];
      a.xo[i * k / 2 + j] = row[2 * j + 1];
    }
    group_sums(row, k, k / groups, a.xq.step[i], a.xsum.data() + i * groups);
  }
  return a;
}

// Asymmetric int4 in groups of 32 (GGUF's Q4_K, AWQ-style offsets) as chunked rows whose chunks
// hold 16 scales, 16 zeros, then 16 x 16 bytes of nibble pairs: R rows against 16-bit activations,
// out[r] = step * sum_g s_rg sum_k q_rk x_k + sum_g (z_rg - 8 s_rg) xsum_g. The same operations in
// the same order as dot_q4 followed by offset_q4, so the same bits as q4_gemv; whole chunks load
// their 16 scales at once.
template <int R, typename S>
void dot_q4z(const uint8_t* w, int64_t stride, const int16_t* xe, const int16_t* xo, const float* xs, float step,
             int64_t groups, float* out) {
  const __m512 eight = _mm512_set1_ps(8.f);
  __m512 acc[R], off[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm512_setzero_ps();
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t left = std::min<int64_t>(16, groups - g0);
    const __mmask16 mk = first_lanes(left);
    const int64_t sb = static_cast<int64_t>(sizeof(S));
    const uint8_t* chunk = w + chunked_bytes<S, 16, 2>(g0);  // row 0's chunk
    const uint8_t* nib = chunk + 2 * left * sb;
    __m512 s16[R];
    for (int r = 0; r < R; ++r) {
      s16[r] = chunk_floats<S>(chunk + r * stride, mk);
      const __m512 z16 = chunk_floats<S>(chunk + r * stride + left * sb, mk);
      off[r] = _mm512_fmadd_ps(_mm512_fnmadd_ps(eight, s16[r], z16), _mm512_maskz_loadu_ps(mk, xs + g0), off[r]);
    }
    int64_t j = 0;
    if (left == 16) {
      for (; j < 16; j += 2) {
        const __m512i e = _mm512_loadu_si512(xe + (g0 + j) * 16), o = _mm512_loadu_si512(xo + (g0 + j) * 16);
        const __m512i pick = _mm512_inserti64x4(_mm512_set1_epi32(static_cast<int>(j)), _mm256_set1_epi32(static_cast<int>(j + 1)), 1);
        for (int r = 0; r < R; ++r) {
          const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(nib + r * stride + j * 16)));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(nibble_products(b, e, o)), _mm512_permutexvar_ps(pick, s16[r]), acc[r]);
        }
      }
      continue;
    }
    for (; j + 2 <= left; j += 2) {  // the row's last chunk: lanes 0-7 group j, 8-15 group j + 1
      const __m512i e = _mm512_loadu_si512(xe + (g0 + j) * 16), o = _mm512_loadu_si512(xo + (g0 + j) * 16);
      for (int r = 0; r < R; ++r) {
        const uint8_t* c = chunk + r * stride;
        const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(chunk_scale<S>(c, j)), _mm256_set1_ps(chunk_scale<S>(c, j + 1)), 1);
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(nib + r * stride + j * 16)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(nibble_products(b, e, o)), sv, acc[r]);
      }
    }
    if (j < left) {  // its last group alone: 16 bytes
      const __m512i e = _mm512_maskz_loadu_epi16(0xFFFFu, xe + (g0 + j) * 16);
      const __m512i o = _mm512_maskz_loadu_epi16(0xFFFFu, xo + (g0 + j) * 16);
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nib + r * stride + j * 16));
        const __m512i p = nibble_products(_mm512_cvtepu8_epi16(_mm256_castsi128_si256(bytes)), e, o);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(chunk_scale<S>(chunk + r * stride, j)), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) * step + hsum(off[r]);
}

// y[M, N] for asymmetric int4 chunked rows [N, K/32 * (16 + 2 x (2 or 4))], 16-bit activations.
at::Tensor q4z_gemv(const at::Tensor& x, const at::Tensor& rows) {
  const bool half = check_chunked(x, rows, 16, "q4z_gemv", 2);
  const int64_t k = x.size(1), groups = k / 32;
  const Q4Activations a = q4_activations(x, groups);
  return chunked_gemv(x, rows, half, [&](auto r_, auto s_, const uint8_t* w, int64_t stride, int64_t i,
                                                      float* out) {
    dot_q4z<decltype(r_)::value, decltype(s_)>(w, stride, a.xe.data() + i * k / 2, a.xo.data() + i * k / 2,
                                               a.xsum.data() + i * groups, a.xq.step[i], groups, out);
  });
}

at::Tensor q4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const c10::optional<at::Tensor>& z) {
  check_x(x, "q4_gemv");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0), groups = s.size(1);
  check_rows(q, k / 2, "q4_gemv");
  TORCH_CHECK(k % 32 == 0 && q.scalar_type() == at::kByte && s.size(0) == n, "q4_gemv: expects uint8 nibbles [N, K/2], K % 32 == 0");
  const int shift = q4_shift(k, groups, "q4_gemv");
  const Scales sc = scales_of(s, "q4_gemv");
  const float* zp = nullptr;
  if (z.has_value()) {
    TORCH_CHECK(z->is_contiguous() && z->scalar_type() == at::kFloat && z->sizes() == s.sizes(), "q4_gemv: zeros must be float32 like scales");
    zp = z->data_ptr<float>();
  }
  const Q4Activations a = q4_activations(x, groups);
  const std::vector<float>& step = a.xq.step;
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* xs = a.xsum.data();
  const int16_t *ep = a.xe.data(), *op = a.xo.data();
  float* yp = y.data_ptr<float>();
  gemv_row_blocks<kInt4GroupRows>(n, m, k, yp, [&](auto rows, int64_t r, int64_t i, float* out) {
    constexpr int R = decltype(rows)::value;
    const auto sr = sc.rows<R>(r, groups);
    dot_q4<R>(qp + r * k / 2, k / 2, ep + i * k / 2, op + i * k / 2, sr.data(), k / 32, shift, out);
  });
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t i = 0; i < m; ++i)
        yp[i * n + r] = yp[i * n + r] * step[i] +
                        offset_q4(sc.row(r, groups), zp ? zp + r * groups : nullptr, xs + i * groups, groups);
  });
  return y;
}


// Whole weights for prefill (a GEMM then runs on them): [N, K] in bf16 (rounded to nearest even,
// as a cast does) or float32.
void store16(float* f32, uint16_t* bf16, int64_t at, __m512 v) {
  if (bf16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(bf16 + at), (__m256i)_mm512_cvtneps_pbh(v));
  else _mm512_storeu_ps(f32 + at, v);
}

struct Out {
  at::Tensor t;
  float* f32 = nullptr;
  uint16_t* bf16 = nullptr;
};

Out make_out(int64_t n, int64_t k, const at::Tensor& like, at::ScalarType dtype) {
  Out o;
  const bool bf = dtype == at::kBFloat16;
  o.t = at::empty({n, k}, like.options().dtype(bf ? at::kBFloat16 : at::kFloat));
  if (bf) o.bf16 = reinterpret_cast<uint16_t*>(o.t.data_ptr<at::BFloat16>());
  else o.f32 = o.t.data_ptr<float>();
  return o;
}

// Output order of a 4-bit group: weight 2j from the low nibble of byte j, 2j + 1 from its high nibble.
const __m512i kNibbleFirst = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
const __m512i kNibbleSecond = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);

// One group of 32 4-bit weights (16 bytes of nibble pairs) into o at `at`: (q - 8) * s + z with the
// reference's two roundings (no fused multiply-add).
inline void q4_group(const Out& o, int64_t at, const uint8_t* bytes, float s, float z) {
  const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z), eight = _mm512_set1_ps(8.f);
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512 ql = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))), eight);
  const __m512 qh = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), eight);
  const __m512 low = _mm512_add_ps(_mm512_mul_ps(ql, sv), zv), high = _mm512_add_ps(_mm512_mul_ps(qh, sv), zv);
  store16(o.f32, o.bf16, at, _mm512_permutex2var_ps(low, kNibbleFirst, high));
  store16(o.f32, o.bf16, at + 16, _mm512_permutex2var_ps(low, kNibbleSecond, high));
}

// 16 int8 weights times s into o at `at`.
inline void q8_values(const Out& o, int64_t at, const int8_t* v, float s) {
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v))));
  store16(o.f32, o.bf16, at, _mm512_mul_ps(f, _mm512_set1_ps(s)));
}

at::Tensor q4_dequant(const at::Tensor& q, const at::Tensor& s, const c10::optional<at::Tensor>& z, at::ScalarType dtype) {
  const int64_t n = q.size(0), k = q.size(1) * 2, groups = s.size(1);
  TORCH_CHECK(q.is_contiguous() && k % 32 == 0 && s.size(0) == n, "q4_dequant: bad shapes");
  const int shift = q4_shift(k, groups, "q4_dequant");
  const Scales sc = scales_of(s, "q4_dequant");
  const float* zp = z.has_value() ? z->data_ptr<float>() : nullptr;
  Out o = make_out(n, k, s, dtype);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t g = 0; g < k / 32; ++g) {
        const int64_t gi = r * groups + (g >> shift);
        q4_group(o, r * k + g * 32, qp + r * k / 2 + g * 16, sc[gi], zp ? zp[gi] : 0.f);
      }
  });
  return o.t.scalar_type() == dtype ? o.t : o.t.to(dtype);
}

// The weight [N, K] of chunked rows (Q8_0: bits 8, Q4_0: bits 4, H = 1; asymmetric int4: H = 2,
// zeros after the scales; float16 or float32 S).
template <typename S, int64_t B, int64_t H>
void chunked_dequant_rows(const uint8_t* rows, int64_t stride, int64_t lo, int64_t hi, int64_t k, const Out& o) {
  const int64_t groups = k / 32, sb = static_cast<int64_t>(sizeof(S));
  for (int64_t r = lo; r < hi; ++r)
    for (int64_t g0 = 0; g0 < groups; g0 += 16) {
      const int64_t left = std::min<int64_t>(16, groups - g0);
      const uint8_t* chunk = rows + r * stride + chunked_bytes<S, B, H>(g0);
      const uint8_t* v = chunk + H * left * sb;
      for (int64_t j = 0; j < left; ++j) {
        const int64_t at = r * k + (g0 + j) * 32;
        const float sj = chunk_scale<S>(chunk, j);
        if constexpr (B == 16) {
          q4_group(o, at, v + 16 * j, sj, H == 2 ? chunk_scale<S>(chunk + left * sb, j) : 0.f);
        } else {
          q8_values(o, at, reinterpret_cast<const int8_t*>(v + 32 * j), sj);
          q8_values(o, at + 16, reinterpret_cast<const int8_t*>(v + 32 * j + 16), sj);
        }
      }
    }
}

at::Tensor chunked_dequant(const at::Tensor& rows, int64_t k, int64_t bits, bool zeros, at::ScalarType dtype) {
  TORCH_CHECK(bits == 4 || (bits == 8 && !zeros), "chunked_dequant: bits must be 4 or 8 (zeros with 4 only)");
  const int64_t n = rows.size(0), stride = rows.size(1), h = zeros ? 2 : 1;
  const bool half = chunked_half(rows, k, bits == 4 ? 16 : 32, "chunked_dequant", h);
  Out o = make_out(n, k, rows, dtype);
  const uint8_t* rp = rows.data_ptr<uint8_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    auto run = [&](auto s_, auto b_, auto h_) {
      chunked_dequant_rows<decltype(s_), decltype(b_)::value, decltype(h_)::value>(rp, stride, lo, hi, k, o);
    };
    using B16 = std::integral_constant<int64_t, 16>;
    using B32 = std::integral_constant<int64_t, 32>;
    using H1 = std::integral_constant<int64_t, 1>;
    using H2 = std::integral_constant<int64_t, 2>;
    if (bits == 8) half ? run(uint16_t{}, B32{}, H1{}) : run(float{}, B32{}, H1{});
    else if (zeros) half ? run(uint16_t{}, B16{}, H2{}) : run(float{}, B16{}, H2{});
    else half ? run(uint16_t{}, B16{}, H1{}) : run(float{}, B16{}, H1{});
  });
  return o.t.scalar_type() == dtype ? o.t : o.t.to(dtype);
}

at::Tensor q8_dequant(const at::Tensor& q, const at::Tensor& s, int64_t group, at::ScalarType dtype) {
  const int64_t n = q.size(0), k = q.size(1), groups = k / group;
  TORCH_CHECK((group == 16 || group == 32) && q.is_contiguous() && k % group == 0 && s.size(0) == n && s.size(1) == groups,
              "q8_dequant: bad shapes");
  const Scales sc = scales_of(s, "q8_dequant");
  Out o = make_out(n, k, s, dtype);
  const int8_t* qp = q.data_ptr<int8_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t i = 0; i < k; i += 16) q8_values(o, r * k + i, qp + r * k + i, sc[r * groups + i / group]);
  });
  return o.t.scalar_type() == dtype ? o.t : o.t.to(dtype);
}

// GGML's Q6_K blocks as stored in a GGUF file, a row of K weights = K / 256 blocks of 210 bytes:
// 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16 weights), float16 d;
// w = d * scale * (q - 32) with q in 0..63. Weight i of a half h (128 weights) and part p (32) at
// l: low nibble of byte 64h + 32(p & 1) + l (p < 2: low, else high nibble), 2 high bits at
// (byte 128 + 32h + l) >> 2p.
constexpr int64_t kQ6Block = 210;

// llama.cpp's Q8_K activations (quantize_row_q8_K): per 256 values iscale = -127 / max, where max
// is the value of the largest magnitude (the first on ties), q = min(127, iscale * x rounded to
// even), d = 1 / iscale, and the sums of each 16 q. A block holding NaN or an infinity gets
// d = NaN, which the row's result then carries.
struct Q8KBlocks {
  std::vector<int8_t> q;      // [M, K]
  std::vector<int16_t> bsum;  // [M, K/16]
  std::vector<float> d;       // [M, K/256]
};

Q8KBlocks q8_k_blocks(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), blocks = m * k / 256;
  const auto xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  Q8KBlocks b{std::vector<int8_t>(m * k), std::vector<int16_t>(m * k / 16), std::vector<float>(blocks)};
  for (int64_t g = 0; g < blocks; ++g) {
    const float* v = xp + 256 * g;
    float amax = 0.f, max = 0.f;
    bool finite = true;
    for (int j = 0; j < 256; ++j) {
      finite &= std::isfinite(v[j]);
      if (std::fabs(v[j]) > amax) amax = std::fabs(v[j]), max = v[j];
    }
    if (!finite) b.d[g] = NAN;  // q and the sums stay zero
    if (!finite || amax == 0.f) continue;
    const float iscale = -127.f / max;
    int8_t* q = b.q.data() + 256 * g;
    for (int j = 0; j < 256; ++j) q[j] = static_cast<int8_t>(std::min(127.f, std::nearbyint(iscale * v[j])));
    for (int j = 0; j < 16; ++j) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) sum += q[16 * j + i];
      b.bsum[16 * g + j] = static_cast<int16_t>(sum);
    }
    b.d[g] = 1.f / iscale;
  }
  return b;
}

// The 128 values 0..63 of half h of a Q6_K block as two vectors of 64 bytes, in the order of the
// weights: q01 (parts 0, 1) and q23 (parts 2, 3). The 2-bit pairs of parts 0|1 sit at bits 0-1|2-3
// of hb and those of parts 2|3 at bits 4-5|6-7: shifted by 0|2 and masked with 0x33, each byte
// holds its part's pairs at bits 0-1 (for q01, moved up by 4) and 4-5 (for q23), and one bit
// select (vpternlogd) joins them with the low nibbles.
inline void q6_half(const uint8_t* block, int h, __m512i& q01, __m512i& q23) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i ab = _mm512_loadu_si512(block + 64 * h);  // low nibbles of parts 0|1 (low) and 2|3 (high)
  const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h));
  const __m512i hm = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(hb), _mm256_srli_epi16(hb, 2), 1),
                                      _mm512_set1_epi8(0x33));
  constexpr int kSelect = 0xE4;  // nib ? first : second, bit by bit
  q01 = _mm512_ternarylogic_epi32(ab, _mm512_slli_epi16(hm, 4), nib, kSelect);
  q23 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ab, 4), hm, nib, kSelect);
}

// Q6_K x Q8_K as llama.cpp computes it: R rows of blocks (`stride` bytes apart) against one row of
// Q8_K blocks, out[r] = sum_b d_rb d_b sum_j sc_rbj (sum_{16 of j} q xq - 32 bsum_bj). The sums are
// exact in int32: vpmaddubsw (q unsigned times xq: |2 * 63 * 127| < 2^15, no saturation), then
// vpdpwssd with each pair's 8-bit scale; one float32 multiply-add per block.
// Scale of each 16-bit lane i of the 64 weights hc = 2h + c of a block (h: half, c: parts 0|1 or
// 2|3): the lane pairs weights 2i, 2i + 1, whose scale is 8h + 4c + i / 8.
constexpr auto kQ6Pick = [] {
  std::array<std::array<int16_t, 32>, 4> t{};
  for (int hc = 0; hc < 4; ++hc)
    for (int i = 0; i < 32; ++i) t[hc][i] = static_cast<int16_t>(4 * hc + i / 8);
  return t;
}();

template <int R>
void dot_q6k(const uint8_t* w, int64_t stride, const int8_t* xq, const int16_t* bsum, const float* xd,
             int64_t blocks, float* out) {
  __m512i pick[4];
  for (int hc = 0; hc < 4; ++hc) pick[hc] = _mm512_loadu_si512(kQ6Pick[hc].data());
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk, w += kQ6Block, xq += 256, bsum += 16) {
    const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bsum));
    __m512i x[4];
    for (int j = 0; j < 4; ++j) x[j] = _mm512_loadu_si512(xq + 64 * j);
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * stride;
      const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + 192)));
      __m512i sums = _mm512_setzero_si512();
      for (int h = 0; h < 2; ++h) {
        __m512i q01, q23;
        q6_half(wr, h, q01, q23);
        const __m512i sc01 = _mm512_permutexvar_epi16(pick[2 * h], _mm512_castsi256_si512(sc));
        const __m512i sc23 = _mm512_permutexvar_epi16(pick[2 * h + 1], _mm512_castsi256_si512(sc));
        sums = _mm512_dpwssd_epi32(sums, _mm512_maddubs_epi16(q01, x[2 * h]), sc01);
        sums = _mm512_dpwssd_epi32(sums, _mm512_maddubs_epi16(q23, x[2 * h + 1]), sc23);
      }
      const __m256i off = _mm256_madd_epi16(sc, bs);  // sum_j sc_j bsum_j, in 8 lanes
      sums = _mm512_sub_epi32(sums, _mm512_slli_epi32(_mm512_zextsi256_si512(off), 5));
      uint16_t dh;
      std::memcpy(&dh, wr + 208, 2);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(_cvtsh_ss(dh) * xd[blk]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// Rows of Q6_K read per shared activation load on wide rows (8: 2x one row at a time on
// [3584, 18944] from memory on Zen 4; 12 spilled registers, 0.8x of 8).
constexpr int kQ6kRows = 8;

at::Tensor q6k_gemv(const at::Tensor& x, const at::Tensor& q) {
  check_x(x, "q6k_gemv");
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0), blocks = k / 256;
  TORCH_CHECK(k % 256 == 0 && q.scalar_type() == at::kByte, "q6k_gemv: expects K % 256 == 0 and uint8 blocks");
  check_rows(q, blocks * kQ6Block, "q6k_gemv");
  const Q8KBlocks xb = q8_k_blocks(x);
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  gemv_row_blocks<kQ6kRows>(n, m, k, y.data_ptr<float>(), [&](auto rows, int64_t r, int64_t i, float* out) {
    dot_q6k<decltype(rows)::value>(qp + r * blocks * kQ6Block, blocks * kQ6Block, xb.q.data() + i * k,
                                   xb.bsum.data() + i * k / 16, xb.d.data() + i * blocks, blocks, out);
  });
  return y;
}

at::Tensor q6k_dequant(const at::Tensor& q, int64_t k, at::ScalarType dtype) {
  const int64_t n = q.size(0), blocks = k / 256;
  TORCH_CHECK(k % 256 == 0 && q.is_contiguous() && q.size(1) == blocks * kQ6Block, "q6k_dequant: bad shapes");
  Out o = make_out(n, k, q, dtype);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const uint8_t* w = qp + (r * blocks + blk) * kQ6Block;
        uint16_t dh;
        std::memcpy(&dh, w + 208, 2);
        const float d = _cvtsh_ss(dh);
        for (int h = 0; h < 2; ++h) {
          alignas(64) uint8_t vals[128];  // the half's q in the order of its weights
          __m512i q01, q23;
          q6_half(w, h, q01, q23);
          _mm512_store_si512(vals, q01);
          _mm512_store_si512(vals + 64, q23);
          for (int j = 0; j < 8; ++j) {  // 16 weights share a scale: d * sc exactly, then * (q - 32)
            const __m128i bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(vals + 16 * j));
            const __m512 qv = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(32)));
            const __m512 sv = _mm512_set1_ps(d * static_cast<float>(static_cast<int8_t>(w[192 + 8 * h + j])));
            store16(o.f32, o.bf16, r * k + blk * 256 + 128 * h + 16 * j, _mm512_mul_ps(qv, sv));
          }
        }
      }
  });
  return o.t.scalar_type() == dtype ? o.t : o.t.to(dtype);
}

// ---------------------------------------------------------------------------------------------
// bf16 weights in oneDNN's blocked layout
// ---------------------------------------------------------------------------------------------
// The layout PyTorch's _reorder_linear_weight gives a bf16 weight [N, K] on AVX-512 BF16 CPUs:
// blocks of 64 rows, each [Kp/2][64][2] (value pair 2p, 2p + 1 of the block's 64 rows side by
// side), K padded with zeros to Kp, a multiple of 32, and N to a multiple of 64. quant/linear.py
// holds a weight this way only after checking this kernel against PyTorch's linear on it.
// bf16_blocked_gemv sums every output as oneDNN's matmul does for a single row of x (PyTorch's bf16
// linear while decoding): one float32 vdpbf16ps chain over the pairs of each 512 values of K,
// the chains added in K order.
constexpr int64_t kBlockRows = 64, kBlockPadK = 32, kChainPairs = 256;

struct BlockedBf16 {
  const uint16_t* w;
  int64_t n, k, kp;
};

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

BlockedBf16 blocked_bf16(const at::Tensor& w, const char* name) {
  TORCH_CHECK(at::native::data_ptr_from_mkldnn != nullptr && at::native::nbytes_from_mkldnn != nullptr, name,
              ": this PyTorch does not give access to oneDNN tensors' memory");
  TORCH_CHECK(w.is_mkldnn() && w.dim() == 2 && w.scalar_type() == at::kBFloat16, name,
              ": expects a 2-D bf16 oneDNN (mkldnn) weight");
  const int64_t n = w.size(0), k = w.size(1), kp = round_up(k, kBlockPadK);
  TORCH_CHECK(at::native::nbytes_from_mkldnn(w) == round_up(n, kBlockRows) * kp * 2, name,
              ": the weight is not laid out as [N/64][K/2][64][2]");
  return {static_cast<const uint16_t*>(at::native::data_ptr_from_mkldnn(w)), n, k, kp};
}

// total[16 j + l] += the chain of row 16 j + l (of B blocks `stride` values apart) over pairs
// [p0, p1) of x (p1 - p0 <= kChainPairs), the chain started at zero.
template <int B>
void blocked_chain(const uint16_t* w, int64_t stride, int64_t p0, int64_t p1, const uint32_t* x, float* total) {
  __m512 chain[4 * B];
  for (auto& c : chain) c = _mm512_setzero_ps();
  for (int64_t p = p0; p < p1; ++p) {
    const __m512bh xp = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[p]));
    for (int b = 0; b < B; ++b)
      for (int g = 0; g < 4; ++g)  // rows 16 g .. 16 g + 15 of block b, pair p
        chain[4 * b + g] = _mm512_dpbf16_ps(chain[4 * b + g], (__m512bh)_mm512_loadu_si512(w + b * stride + p * 128 + 32 * g), xp);
  }
  for (int j = 0; j < 4 * B; ++j) _mm512_storeu_ps(total + 16 * j, _mm512_add_ps(_mm512_loadu_ps(total + 16 * j), chain[j]));
}

// Blocks read together (their rows' chains side by side: more streams from memory at once).
constexpr int kBlocksTogether = 6;

// Every row of x (M rows of `pairs` pairs) against `blocks` (<= kBlocksTogether) blocks: total [M, blocks * 64].
template <int B = kBlocksTogether>
void blocked_group(int blocks, const uint16_t* w, int64_t stride, int64_t pairs, const uint32_t* x, int64_t m,
                   float* total) {
  if constexpr (B > 1) {
    if (blocks < B) return blocked_group<B - 1>(blocks, w, stride, pairs, x, m, total);
  }
  for (int64_t p0 = 0; p0 < pairs; p0 += kChainPairs)  // each chunk of the blocks read for all rows while in cache
    for (int64_t i = 0; i < m; ++i)
      blocked_chain<B>(w, stride, p0, std::min(p0 + kChainPairs, pairs), x + i * pairs,
                       total + i * B * kBlockRows);
}

at::Tensor bf16_blocked_gemv(const at::Tensor& x, const at::Tensor& w) {
  check_x(x, "bf16_blocked_gemv");
  const BlockedBf16 bw = blocked_bf16(w, "bf16_blocked_gemv");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.size(1) == bw.k, "bf16_blocked_gemv: expects bf16 x [M, ", bw.k, "]");
  const int64_t m = x.size(0), n = bw.n, kp = bw.kp, stride = kBlockRows * kp;
  std::vector<uint16_t> xpad(m * kp, 0);  // x's rows padded with zeros like K
  for (int64_t i = 0; i < m; ++i)
    std::memcpy(xpad.data() + i * kp, x.data_ptr<at::BFloat16>() + i * bw.k, bw.k * sizeof(uint16_t));
  const auto* xp = reinterpret_cast<const uint32_t*>(xpad.data());
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, round_up(n, kBlockRows) / kBlockRows, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> total(m * kBlocksTogether * kBlockRows);
    for (int64_t ob = lo; ob < hi; ob += kBlocksTogether) {
      const int blocks = static_cast<int>(std::min<int64_t>(kBlocksTogether, hi - ob));
      std::fill(total.begin(), total.end(), 0.f);
      blocked_group(blocks, bw.w + ob * stride, stride, kp / 2, xp, m, total.data());
      const int64_t first = ob * kBlockRows, count = std::min(n - first, blocks * kBlockRows);
      for (int64_t i = 0; i < m; ++i)
        std::memcpy(yp + i * n + first, total.data() + i * blocks * kBlockRows, count * sizeof(float));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(minicpmv_native, lib) {
  lib.def("bf16_gemv(Tensor x, Tensor w) -> Tensor", &bf16_gemv);
  lib.def("bf16_blocked_gemv(Tensor x, Tensor w) -> Tensor", &bf16_blocked_gemv);
  lib.def("q8_gemv(Tensor x, Tensor q, Tensor s, int group) -> Tensor", &q8_gemv);
  lib.def("q4_gemv(Tensor x, Tensor q, Tensor s, Tensor? z) -> Tensor", &q4_gemv);
  lib.def("q4_0_gemv(Tensor x, Tensor rows) -> Tensor", &q4_0_gemv);
  lib.def("q4z_gemv(Tensor x, Tensor rows) -> Tensor", &q4z_gemv);
  lib.def("q8_0_gemv(Tensor x, Tensor rows) -> Tensor", &q8_0_gemv);
  lib.def("q4_dequant(Tensor q, Tensor s, Tensor? z, ScalarType dtype) -> Tensor", &q4_dequant);
  lib.def("q8_dequant(Tensor q, Tensor s, int group, ScalarType dtype) -> Tensor", &q8_dequant);
  lib.def("chunked_dequant(Tensor rows, int k, int bits, bool zeros, ScalarType dtype) -> Tensor", &chunked_dequant);
  lib.def("q6k_gemv(Tensor x, Tensor q) -> Tensor", &q6k_gemv);
  lib.def("q6k_dequant(Tensor q, int k, ScalarType dtype) -> Tensor", &q6k_dequant);
}
