// Scalar and AVX-512 helpers of the CPU kernels (paged_attention.cpp, rows.cpp): bf16 <-> fp32
// as torch converts (round to nearest even, NaN kept), 16-lane loads and stores, a vector exp.
// The AVX-512 functions carry their target attribute (CAI_V4), so the build needs no -march: a
// kernel calls them only after __builtin_cpu_supports says the CPU has AVX-512.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(CAI_FAST_NO_AVX512)  // -DCAI_FAST_NO_AVX512: plain loops only
#include <immintrin.h>
#define CAI_AVX512 1
// GCC 12 warns of the _mm512_undefined_* placeholders inside its own intrinsic headers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define CAI_V4 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,bmi2")))
#define CAI_V4_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,bmi2,avx512bf16")))
#endif

namespace cai {
namespace simd {

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) {  // bf16: the high half of an fp32
  uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float* out, int64_t i, float x) { out[i] = x; }
inline void store(uint16_t* out, int64_t i, float x) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    out[i] = uint16_t((bits >> 16) | 0x40u);  // a NaN stays a (quiet) NaN
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  out[i] = uint16_t(bits >> 16);
}

inline float bf16_round(float x) { uint16_t b; store(&b, 0, x); return to_f32(b); }
// x rounded to T (float: as is; bf16: to the nearest bf16, as fp32)
inline float rounded(float x, float) { return x; }
inline float rounded(float x, uint16_t) { return bf16_round(x); }

inline bool has_avx512() {
#ifdef CAI_AVX512
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

#ifdef CAI_AVX512
// 16 lanes of fp32 a register; bf16 widened on load
CAI_V4 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
CAI_V4 inline __m512 load16(const uint16_t* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// exp(x): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6 (Cephes' expf
// coefficients), within 2 ulp of expf; 0 below -87.3 (and at -inf), inf above 88.7.
CAI_V4 inline __m512 exp16(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512 result = _mm512_scalef_ps(p, n);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ), result,
                              _mm512_setzero_ps());
}

// x rounded to T's precision, still in fp32 lanes (float: as is; bf16: nearest even, NaN kept)
CAI_V4 inline __m512 rounded16(__m512 x, float) { return x; }
CAI_V4 inline __m512 rounded16(__m512 x, uint16_t) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __m512 r = _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, x);
}

// 16 fp32 lanes stored as T (bf16: nearest even, NaN kept), the first `n` of them
CAI_V4 inline void store16(float* p, __m512 x, __mmask16 n = 0xffff) { _mm512_mask_storeu_ps(p, n, x); }
CAI_V4 inline void store16(uint16_t* p, __m512 x, __mmask16 n = 0xffff) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i half = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  half = _mm512_mask_or_epi32(half, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  _mm256_mask_storeu_epi16(p, n, _mm512_cvtepi32_epi16(half));
}
#endif

}  // namespace simd
}  // namespace cai
