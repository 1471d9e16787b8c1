// See rows.h. Rows whose width is a multiple of 16 run AVX-512 loops where the CPU has them, the
// rest plain loops (tests/test_rows.py runs both). A row's sum of squares is taken in double over
// the fp32 squares (torch's fp32 cascade sum rounds differently now and then: the outputs then
// differ from LlamaRMSNorm's in the last bit, which the tests bound); SiLU's exp is exp16's
// (within 2 ulp of expf) on the AVX-512 path, std::exp on the plain one. argmax keeps each lane's
// first maximum, then takes the lowest index among the lanes that hold the row's maximum.
#include "rows.h"

#include "cpu_simd.h"
#include "cpu_threads.h"

#include <limits>

namespace cai {
namespace {

using namespace simd;

template <typename T>
float add_and_sum_squares(T* x, const T* delta, int64_t width) {
  double squares = 0.0;
  for (int64_t i = 0; i < width; ++i) {
    float v = to_f32(x[i]);
    if (delta) {
      v = rounded(v + to_f32(delta[i]), T{});
      store(x, i, v);
    }
    const float square = v * v;  // rounded to fp32, as torch's pow(2)
    squares += square;
  }
  return static_cast<float>(squares);
}

template <typename T>
void norm_row(const T* x, const T* weight, T* out, int64_t width, float scale) {
  for (int64_t i = 0; i < width; ++i) store(out, i, to_f32(weight[i]) * rounded(to_f32(x[i]) * scale, T{}));
}

#ifdef CAI_AVX512
template <typename T>
CAI_V4 float add_and_sum_squares_avx512(T* x, const T* delta, int64_t width) {
  __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
  for (int64_t i = 0; i < width; i += 16) {
    __m512 v = load16(x + i);
    if (delta) {
      v = rounded16(_mm512_add_ps(v, load16(delta + i)), T{});
      store16(x + i, v);
    }
    const __m512 square = _mm512_mul_ps(v, v);
    low = _mm512_add_pd(low, _mm512_cvtps_pd(_mm512_castps512_ps256(square)));
    high = _mm512_add_pd(high, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(square), 1))));
  }
  return static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(low, high)));
}

template <typename T>
CAI_V4 void norm_row_avx512(const T* x, const T* weight, T* out, int64_t width, float scale) {
  const __m512 times = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < width; i += 16)
    store16(out + i, _mm512_mul_ps(load16(weight + i), rounded16(_mm512_mul_ps(load16(x + i), times), T{})));
}

template <typename T>
CAI_V4 void silu_mul_avx512(const T* gate, const T* up, T* out, int64_t width) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < width; i += 16) {
    const __m512 g = load16(gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store16(out + i, _mm512_mul_ps(rounded16(silu, T{}), load16(up + i)));
  }
}

template <typename T>
int64_t first_nan(const T* x, int64_t from, int64_t width) {
  while (from < width && !std::isnan(to_f32(x[from]))) ++from;
  return from;
}

template <typename T>
CAI_V4 int64_t argmax_avx512(const T* x, int64_t width) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i at = _mm512_setzero_si512(), index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  for (int64_t i = 0; i < width; i += 16, index = _mm512_add_epi32(index, step)) {
    const __m512 v = load16(x + i);
    if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return first_nan(x, i, width);
    const __mmask16 greater = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strictly: a lane keeps its first
    best = _mm512_mask_mov_ps(best, greater, v);
    at = _mm512_mask_mov_epi32(at, greater, index);
  }
  const __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
  return _mm512_mask_reduce_min_epi32(top, at);
}
#endif

template <typename T>
int64_t argmax_row(const T* x, int64_t width) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t at = 0;
  for (int64_t i = 0; i < width; ++i) {
    const float v = to_f32(x[i]);
    if (std::isnan(v)) return i;
    if (v > best) best = v, at = i;
  }
  return at;
}

template <typename T>
void argmax_share(const T* x, int64_t r0, int64_t r1, int64_t width, int64_t* out, [[maybe_unused]] bool vector) {
  for (int64_t r = r0; r < r1; ++r) {
#ifdef CAI_AVX512
    if (vector) {
      out[r] = argmax_avx512(x + r * width, width);
      continue;
    }
#endif
    out[r] = argmax_row(x + r * width, width);
  }
}

template <typename T>
void add_norm_rows(T* x, const T* delta, const T* weight, T* out, int64_t r0, int64_t r1, int64_t width, float eps,
                   [[maybe_unused]] bool vector) {
  for (int64_t r = r0; r < r1; ++r) {
    T* xr = x + r * width;
    const T* dr = delta ? delta + r * width : nullptr;
#ifdef CAI_AVX512
    const float squares = vector ? add_and_sum_squares_avx512(xr, dr, width) : add_and_sum_squares(xr, dr, width);
#else
    const float squares = add_and_sum_squares(xr, dr, width);
#endif
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(width) + eps);  // torch.rsqrt: 1 / sqrt
#ifdef CAI_AVX512
    if (vector) {
      norm_row_avx512(xr, weight, out + r * width, width, scale);
      continue;
    }
#endif
    norm_row(xr, weight, out + r * width, width, scale);
  }
}

template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t r0, int64_t r1, int64_t width, [[maybe_unused]] bool vector) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* gate = gate_up + r * 2 * width;
    const T* up = gate + width;
    T* o = out + r * width;
#ifdef CAI_AVX512
    if (vector) {
      silu_mul_avx512(gate, up, o, width);
      continue;
    }
#endif
    for (int64_t i = 0; i < width; ++i) {
      const float g = to_f32(gate[i]);
      store(o, i, rounded(g / (1.0f + std::exp(-g)), T{}) * to_f32(up[i]));
    }
  }
}

// run(r0, r1) over shares of [0, rows) on torch's threads, a share at least `least` rows (below
// that a thread's start costs more than the rows it takes)
template <typename Run>
void row_shares(int64_t rows, int64_t least, const Run& run) {
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(gomp().threads(), rows / least));
  parallel_tasks(shares, [&](int64_t t) { run(rows * t / shares, rows * (t + 1) / shares); });
}

constexpr int64_t kLeastRows = 4;  // a share of add_rms_norm / silu_mul (576-3072 wide rows: ~1 us)

}  // namespace

std::string add_rms_norm(void* x, const void* delta, const void* weight, void* out, int64_t rows, int64_t width,
                         float eps, RowDType dtype, bool portable) {
  if (rows < 0 || width <= 0) return "rows must be >= 0 and width > 0";
  const bool vector = !portable && width % 16 == 0 && has_avx512();
  row_shares(rows, kLeastRows, [&](int64_t r0, int64_t r1) {
    if (dtype == RowDType::bf16)
      add_norm_rows(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(delta),
                    static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), r0, r1, width, eps, vector);
    else
      add_norm_rows(static_cast<float*>(x), static_cast<const float*>(delta), static_cast<const float*>(weight),
                    static_cast<float*>(out), r0, r1, width, eps, vector);
  });
  return "";
}

std::string silu_mul(const void* gate_up, void* out, int64_t rows, int64_t width, RowDType dtype, bool portable) {
  if (rows < 0 || width <= 0) return "rows must be >= 0 and width > 0";
  const bool vector = !portable && width % 16 == 0 && has_avx512();
  row_shares(rows, kLeastRows, [&](int64_t r0, int64_t r1) {
    if (dtype == RowDType::bf16)
      silu_mul_rows(static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(out), r0, r1, width, vector);
    else
      silu_mul_rows(static_cast<const float*>(gate_up), static_cast<float*>(out), r0, r1, width, vector);
  });
  return "";
}

std::string argmax_rows(const void* x, int64_t rows, int64_t width, RowDType dtype, int64_t* out, bool portable) {
  if (rows < 0 || width <= 0) return "rows must be >= 0 and width > 0";
  const bool vector = !portable && width % 16 == 0 && has_avx512();
  row_shares(rows, 1, [&](int64_t r0, int64_t r1) {
    if (dtype == RowDType::bf16)
      argmax_share(static_cast<const uint16_t*>(x), r0, r1, width, out, vector);
    else
      argmax_share(static_cast<const float*>(x), r0, r1, width, out, vector);
  });
  return "";
}

}  // namespace cai
