// Decode-time matrix-vector kernels for x86-64 with AVX-512 (BF16 + VNNI), built on first use by
// minicpmv/quant/native.py and registered as torch.ops.minicpmv_native.*.
//
// Every kernel computes y[M, N] = x[M, K] @ W[N, K]^T for a few rows of x (decoding: M is the batch),
// reading each weight row once for all M rows, split over rows of W with ATen's thread pool.
// * bf16_gemv: bf16 weights and activations, products summed in float32 (vdpbf16ps).
// * q8_gemv: int8 weights with one float32 scale per `group` (16 or 32) weights of a row, or per row.
// * q4_gemv: 4-bit weights, groups of 32, w = (q - 8) * s + z (q in 0..15; nibble pairs: even k low,
//   odd k high; z absent for symmetric formats such as GGUF's Q4_0), quant/linear.py's int4 storage.
// * q6k_gemv: GGML's Q6_K blocks read as stored (0.82 byte per weight).
// * q4_dequant / q8_dequant / q6k_dequant: the whole weight, for prefill (where a GEMM runs on it).
// The integer kernels take activations as 16-bit fixed point per row (x = xq * 2^(e - 15) with
// |x| < 2^e), multiply-add them with vpdpwssd and scale each group's exact int32 partial sums in
// float32. This file does not choose when the kernels apply (quant/linear.py does).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__) || !defined(__AVX512BF16__)
#error "minicpmv native kernels need AVX-512 F, BW, VNNI and BF16"
#endif

namespace {

constexpr int64_t kGrain = 16;   // rows of W per task

// y[i, r] = dot(r, i) for every row r of W (tasks of kGrain rows) and row i of x. (Sweeping the
// columns in L1-sized chunks across a block of rows measured slower: shorter weight streams.)
template <typename Dot>
void gemv_rows(int64_t n, int64_t m, float* y, const Dot& dot) {
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t i = 0; i < m; ++i) y[i * n + r] = dot(r, i);
  });
}

float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// One row of activations as 16-bit fixed point: returns the step 2^(e - 15).
float to_fixed(const float* x, int64_t k, int16_t* out) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 mk = k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1u);
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
    const __mmask16 mk = k - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - i)) - 1u);
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

void check_rows(const at::Tensor& x, const at::Tensor& w, int64_t k_per_row, const char* name) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, name, ": expects 2-D x and weight");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), name, ": expects contiguous tensors");
  TORCH_CHECK(w.size(1) == k_per_row, name, ": weight has ", w.size(1), " columns, expected ", k_per_row);
}

// Scales as float32 or float16 (float16 where that is exact, e.g. GGUF's Q4_0 / Q8_0 block scales).
struct Scales {
  const float* f32 = nullptr;
  const uint16_t* f16 = nullptr;
  float operator[](int64_t i) const { return f32 ? f32[i] : _cvtsh_ss(f16[i]); }
  Scales row(int64_t r, int64_t len) const { return f32 ? Scales{f32 + r * len, nullptr} : Scales{nullptr, f16 + r * len}; }
};

Scales scales_of(const at::Tensor& s, const char* name) {
  TORCH_CHECK(s.is_contiguous() && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kHalf),
              name, ": scales must be contiguous float32 or float16");
  if (s.scalar_type() == at::kFloat) return Scales{s.data_ptr<float>(), nullptr};
  return Scales{nullptr, reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>())};
}

float dot_bf16(const uint16_t* w, const uint16_t* x, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(x + i + 32));
  }
  for (; i < k; i += 32) {
    const __mmask32 m = k - i >= 32 ? 0xFFFFFFFFu : ((1u << (k - i)) - 1u);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + i), (__m512bh)_mm512_maskz_loadu_epi16(m, x + i));
  }
  return hsum(_mm512_add_ps(a0, a1));
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) {
  check_rows(x, w, x.size(1), "bf16_gemv");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_gemv: expects bf16");
  const int64_t m = x.size(0), n = w.size(0), k = x.size(1);
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  gemv_rows(n, m, yp, [&](int64_t r, int64_t i) {
    return dot_bf16(wp + r * k, xp + i * k, k);
  });
  return y;
}

// Sum over groups of 16 weights: int8 row `w`, fixed-point activations `x`, one scale per group.
float dot_q8_g16(const int8_t* w, const int16_t* x, Scales s, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {  // 32 weights: lanes 0-7 group g, lanes 8-15 group g + 1
    const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16)));
    const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv, _mm512_loadu_si512(x + g * 16));
    const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s[g]), _mm256_set1_ps(s[g + 1]), 1);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sv, acc);
  }
  if (g < groups) {
    const __m512i wv = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16))));
    const __m512i xv = _mm512_maskz_loadu_epi16(0xFFFFu, x + g * 16);
    const __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv, xv);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(s[g]), acc);
  }
  return hsum(acc);
}

float dot_q8_g32(const int8_t* w, const int16_t* x, Scales s, int64_t groups) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  // two chains: hide the FMA latency
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 32)));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 32 + 32)));
    const __m512i p0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x + g * 32));
    const __m512i p1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(x + g * 32 + 32));
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(s[g]), a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p1), _mm512_set1_ps(s[g + 1]), a1);
  }
  if (g < groups) {
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 32)));
    const __m512i p0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x + g * 32));
    a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p0), _mm512_set1_ps(s[g]), a0);
  }
  return hsum(_mm512_add_ps(a0, a1));
}

// Per output channel (one scale per row, applied by the caller): exact int32 sums of 32 products
// each, added in float32.
float dot_q8_row(const int8_t* w, const int16_t* x, int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i + 32)));
    a0 = _mm512_add_ps(a0, _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x + i))));
    a1 = _mm512_add_ps(a1, _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w1, _mm512_loadu_si512(x + i + 32))));
  }
  for (; i < k; i += 32) {
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
    a0 = _mm512_add_ps(a0, _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_loadu_si512(x + i))));
  }
  return hsum(_mm512_add_ps(a0, a1));
}

at::Tensor q8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group) {
  if (group == 0) {  // per output channel: s is [N]
    check_rows(x, q, x.size(1), "q8_gemv");
    const int64_t m = x.size(0), n = q.size(0), k = x.size(1);
    TORCH_CHECK(k % 32 == 0 && q.scalar_type() == at::kChar && s.dim() == 1 && s.size(0) == n,
                "q8_gemv: per-channel int8 needs K % 32 == 0, int8 weights and [N] scales");
    const Scales sc = scales_of(s, "q8_gemv");
    const FixedRows xq = fixed_rows(x);
    auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
    const int8_t* qp = q.data_ptr<int8_t>();
    float* yp = y.data_ptr<float>();
    gemv_rows(n, m, yp, [&](int64_t r, int64_t i) {
      return dot_q8_row(qp + r * k, xq.q.data() + i * k, k) * (sc[r] * xq.step[i]);
    });
    return y;
  }
  TORCH_CHECK(group == 16 || group == 32, "q8_gemv: group must be 16 or 32 (0: per channel)");
  check_rows(x, q, x.size(1), "q8_gemv");
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
  gemv_rows(n, m, yp, [&](int64_t r, int64_t i) {
    const Scales sr = sc.row(r, groups);
    return group == 16 ? dot_q8_g16(qp + r * k, xp + i * k, sr, groups) : dot_q8_g32(qp + r * k, xp + i * k, sr, groups);
  });
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) yp[i * n + r] *= step[i];
  return y;
}

// 16 scales from g on (mask: which lanes exist), as float32.
__m512 load_scales(Scales s, int64_t g, __mmask16 mk) {
  if (s.f32) return _mm512_maskz_loadu_ps(mk, s.f32 + g);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, s.f16 + g));
}

// 4-bit row: bytes b hold weights 2b (low nibble) and 2b + 1 (high); xe/xo are the even/odd
// activations, 16 of each per group of 32 weights. Returns sum_g s_g * sum_k q_k * x_k.
float dot_q4(const uint8_t* w, const int16_t* xe, const int16_t* xo, Scales s, int64_t groups, int shift) {
  const __m512i low = _mm512_set1_epi16(0x0F);
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  if (shift == 0) {  // one scale per 32 weights (GGUF's Q4_0 / Q4_K): 16 scales loaded at once
    for (; g + 16 <= groups; g += 16) {
      const __m512 s16 = load_scales(s, g, 0xFFFF);
      for (int j = 0; j < 8; ++j) {
        const int64_t gg = g + 2 * j;
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + gg * 16)));
        __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b, low), _mm512_loadu_si512(xe + gg * 16));
        p = _mm512_dpwssd_epi32(p, _mm512_srli_epi16(b, 4), _mm512_loadu_si512(xo + gg * 16));
        const __m512i pick = _mm512_inserti64x4(_mm512_set1_epi32(2 * j), _mm256_set1_epi32(2 * j + 1), 1);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(pick, s16), acc);
      }
    }
  }
  for (; g + 2 <= groups; g += 2) {  // 64 weights in 32 bytes: lanes 0-7 group g, 8-15 group g + 1
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 16)));
    __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b, low), _mm512_loadu_si512(xe + g * 16));
    p = _mm512_dpwssd_epi32(p, _mm512_srli_epi16(b, 4), _mm512_loadu_si512(xo + g * 16));
    const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s[g >> shift]), _mm256_set1_ps(s[(g + 1) >> shift]), 1);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), sv, acc);
  }
  if (g < groups) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * 16))));
    __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_and_si512(b, low), _mm512_maskz_loadu_epi16(0xFFFFu, xe + g * 16));
    p = _mm512_dpwssd_epi32(p, _mm512_srli_epi16(b, 4), _mm512_maskz_loadu_epi16(0xFFFFu, xo + g * 16));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(s[g >> shift]), acc);
  }
  return hsum(acc);
}

// sum_g (z_g - 8 s_g) * xsum_g: the offset part of w = (q - 8) * s + z (z absent: zero).
float offset_q4(Scales s, const float* z, const float* xs, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 eight = _mm512_set1_ps(8.f);
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mk = groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (groups - g)) - 1u);
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

at::Tensor q4_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const c10::optional<at::Tensor>& z) {
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0), groups = s.size(1);
  check_rows(x, q, k / 2, "q4_gemv");
  TORCH_CHECK(k % 32 == 0 && q.scalar_type() == at::kByte && s.size(0) == n, "q4_gemv: expects uint8 nibbles [N, K/2], K % 32 == 0");
  const int shift = q4_shift(k, groups, "q4_gemv");
  const Scales sc = scales_of(s, "q4_gemv");
  const float* zp = nullptr;
  if (z.has_value()) {
    TORCH_CHECK(z->is_contiguous() && z->scalar_type() == at::kFloat && z->sizes() == s.sizes(), "q4_gemv: zeros must be float32 like scales");
    zp = z->data_ptr<float>();
  }
  const FixedRows xq = fixed_rows(x);
  const std::vector<float>& step = xq.step;
  std::vector<float> xsum(m * groups);  // [M, G]
  std::vector<int16_t> xe(m * k / 2), xo(m * k / 2);  // [M, K/2]: even / odd k
  for (int64_t i = 0; i < m; ++i) {
    const int16_t* row = xq.q.data() + i * k;
    for (int64_t j = 0; j < k / 2; ++j) {
      xe[i * k / 2 + j] = row[2 * j];
      xo[i * k / 2 + j] = row[2 * j + 1];
    }
    // group sums of the same rounded activations the dot products see, so that the offset and
    // the nibble sums share one rounding of x: the error is that of w = (q - 8) s + z, not of q s
    group_sums(row, k, k / groups, step[i], xsum.data() + i * groups);
  }
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* xs = xsum.data();
  const int16_t *ep = xe.data(), *op = xo.data();
  float* yp = y.data_ptr<float>();
  gemv_rows(n, m, yp, [&](int64_t r, int64_t i) {
    return dot_q4(qp + r * k / 2, ep + i * k / 2, op + i * k / 2, sc.row(r, groups), k / 32, shift);
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

at::Tensor q4_dequant(const at::Tensor& q, const at::Tensor& s, const c10::optional<at::Tensor>& z, at::ScalarType dtype) {
  const int64_t n = q.size(0), k = q.size(1) * 2, groups = s.size(1);
  TORCH_CHECK(q.is_contiguous() && k % 32 == 0 && s.size(0) == n, "q4_dequant: bad shapes");
  const int shift = q4_shift(k, groups, "q4_dequant");
  const Scales sc = scales_of(s, "q4_dequant");
  const float* zp = z.has_value() ? z->data_ptr<float>() : nullptr;
  Out o = make_out(n, k, s, dtype);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  // output order: weight 2j from the low nibble of byte j, 2j + 1 from its high nibble
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t g = 0; g < k / 32; ++g) {
        const int64_t gi = r * groups + (g >> shift);
        // (q - 8) * s + z with the reference's two roundings (no fused multiply-add)
        const __m512 sv = _mm512_set1_ps(sc[gi]), zv = _mm512_set1_ps(zp ? zp[gi] : 0.f), eight = _mm512_set1_ps(8.f);
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qp + r * k / 2 + g * 16)));
        const __m512 ql = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15))), eight);
        const __m512 qh = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), eight);
        const __m512 low = _mm512_add_ps(_mm512_mul_ps(ql, sv), zv), high = _mm512_add_ps(_mm512_mul_ps(qh, sv), zv);
        store16(o.f32, o.bf16, r * k + g * 32, _mm512_permutex2var_ps(low, first, high));
        store16(o.f32, o.bf16, r * k + g * 32 + 16, _mm512_permutex2var_ps(low, second, high));
      }
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
      for (int64_t i = 0; i < k; i += 16) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qp + r * k + i))));
        store16(o.f32, o.bf16, r * k + i, _mm512_mul_ps(v, _mm512_set1_ps(sc[r * groups + i / group])));
      }
  });
  return o.t.scalar_type() == dtype ? o.t : o.t.to(dtype);
}

// GGML's Q6_K blocks as stored in a GGUF file, a row of K weights = K / 256 blocks of 210 bytes:
// 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16 weights), float16 d;
// w = d * scale * (q - 32) with q in 0..63. Weight i of a half h (128 weights) and part p (32) at
// l: low nibble of byte 64h + 32(p & 1) + l (p < 2: low, else high nibble), 2 high bits at
// (byte 128 + 32h + l) >> 2p.
constexpr int64_t kQ6Block = 210;

// The 32 values 0..63 of part p of one half (low bytes a/b, high byte h), as 32 bytes.
__m256i q6_part(__m256i a, __m256i b, __m256i h, int p) {
  const __m256i nib = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
  const __m256i src = (p & 1) ? b : a;
  const __m256i low = p < 2 ? _mm256_and_si256(src, nib) : _mm256_and_si256(_mm256_srli_epi16(src, 4), nib);
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(h, 2 * p), two);
  return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
}

// sum over one row of Q6_K blocks of w * x (x as 16-bit fixed point). Per half, parts 0+1 and
// 2+3 are decoded 64 at a time; the "- 32" of every weight is folded into one offset per block:
// d * sum_j sc_j * (sum_{16 weights of j} q x - 32 * sum_{16 of j} x).
float dot_q6k(const uint8_t* w, const int16_t* x, const float* xsum16, int64_t blocks) {
  const __m512i nib = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x03);
  // scale index per lane for part p of half h: lanes 0-7 -> 8h + 2p, lanes 8-15 -> 8h + 2p + 1
  __m512i idx[8];
  for (int hp = 0; hp < 8; ++hp)
    idx[hp] = _mm512_set_epi32(2 * hp + 1, 2 * hp + 1, 2 * hp + 1, 2 * hp + 1, 2 * hp + 1, 2 * hp + 1, 2 * hp + 1,
                               2 * hp + 1, 2 * hp, 2 * hp, 2 * hp, 2 * hp, 2 * hp, 2 * hp, 2 * hp, 2 * hp);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t blk = 0; blk < blocks; ++blk, w += kQ6Block, x += 256, xsum16 += 16) {
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 192))));
    uint16_t dh;
    std::memcpy(&dh, w + 208, 2);
    __m512 part_acc = _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_loadu_ps(xsum16)), _mm512_set1_ps(-32.f));
    for (int h = 0; h < 2; ++h) {
      const __m512i ab = _mm512_loadu_si512(w + 64 * h);  // low nibbles of parts 0|1 (low) and 2|3 (high)
      const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * h));
      const __m512i h01 = _mm512_inserti64x4(_mm512_castsi256_si512(hb), _mm256_srli_epi16(hb, 2), 1);
      const __m512i q01 = _mm512_or_si512(_mm512_and_si512(ab, nib), _mm512_slli_epi16(_mm512_and_si512(h01, two), 4));
      const __m512i q23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ab, 4), nib),
                                          _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(h01, 4), two), 4));
      const __m256i parts[4] = {_mm512_castsi512_si256(q01), _mm512_extracti64x4_epi64(q01, 1),
                                _mm512_castsi512_si256(q23), _mm512_extracti64x4_epi64(q23, 1)};
      for (int p = 0; p < 4; ++p) {
        const __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_cvtepu8_epi16(parts[p]),
                                              _mm512_loadu_si512(x + 128 * h + 32 * p));
        part_acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_permutexvar_ps(idx[4 * h + p], sc), part_acc);
      }
    }
    acc = _mm512_fmadd_ps(part_acc, _mm512_set1_ps(_cvtsh_ss(dh)), acc);
  }
  return hsum(acc);
}

at::Tensor q6k_gemv(const at::Tensor& x, const at::Tensor& q) {
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0), blocks = k / 256;
  TORCH_CHECK(k % 256 == 0 && q.scalar_type() == at::kByte, "q6k_gemv: expects K % 256 == 0 and uint8 blocks");
  check_rows(x, q, blocks * kQ6Block, "q6k_gemv");
  const FixedRows xq = fixed_rows(x);
  const std::vector<float>& step = xq.step;
  std::vector<float> xsum16(m * k / 16);  // [M, K/16]: sums of 16 fixed-point activations
  for (int64_t i = 0; i < m; ++i) group_sums(xq.q.data() + i * k, k, 16, 1.f, xsum16.data() + i * k / 16);
  auto y = at::empty({m, n}, x.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int16_t* xp = xq.q.data();
  const float* sp = xsum16.data();
  float* yp = y.data_ptr<float>();
  gemv_rows(n, m, yp, [&](int64_t r, int64_t i) {
    return dot_q6k(qp + r * blocks * kQ6Block, xp + i * k, sp + i * k / 16, blocks);
  });
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) yp[i * n + r] *= step[i];
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
          const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * h));
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * h + 32));
          const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * h));
          for (int p = 0; p < 4; ++p) {
            const __m256i q8 = q6_part(a, b, hb, p);
            for (int half16 = 0; half16 < 2; ++half16) {  // 16 weights share a scale: d * sc exactly, then * (q - 32)
              const __m128i bytes = half16 ? _mm256_extracti128_si256(q8, 1) : _mm256_castsi256_si128(q8);
              const __m512 qv = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(32)));
              const int si = 8 * h + 2 * p + half16;
              const __m512 sv = _mm512_set1_ps(d * static_cast<float>(static_cast<int8_t>(w[192 + si])));
              store16(o.f32, o.bf16, r * k + blk * 256 + 128 * h + 32 * p + 16 * half16, _mm512_mul_ps(qv, sv));
            }
          }
        }
      }
  });
  return o.t.scalar_type() == dtype ? o.t : o.t.to(dtype);
}

}  // namespace

TORCH_LIBRARY(minicpmv_native, lib) {
  lib.def("bf16_gemv(Tensor x, Tensor w) -> Tensor", &bf16_gemv);
  lib.def("q8_gemv(Tensor x, Tensor q, Tensor s, int group) -> Tensor", &q8_gemv);
  lib.def("q4_gemv(Tensor x, Tensor q, Tensor s, Tensor? z) -> Tensor", &q4_gemv);
  lib.def("q4_dequant(Tensor q, Tensor s, Tensor? z, ScalarType dtype) -> Tensor", &q4_dequant);
  lib.def("q8_dequant(Tensor q, Tensor s, int group, ScalarType dtype) -> Tensor", &q8_dequant);
  lib.def("q6k_gemv(Tensor x, Tensor q) -> Tensor", &q6k_gemv);
  lib.def("q6k_dequant(Tensor q, int k, ScalarType dtype) -> Tensor", &q6k_dequant);
}
