// See paged_attention.h. A task is a share of the requests × a share of the kv heads, one a thread
// (torch's OpenMP threads): for each kv head, the keys every request shares are scored against all
// the share's queries at once, then each request's own keys against its group of query heads, a
// chunk at a time straight from the pool's blocks, with an online softmax (running max and sum, in
// fp32) accumulating the values. A query's arithmetic does not depend on the split. The hot loops
// have an AVX-512 version (intrinsics in functions compiled for it, taken where the CPU has it and
// head_dim % 16 == 0), so the build needs no -march and runs on any x86-64; elsewhere, and for
// other head sizes, plain loops that the compiler vectorises as it can.
#include "paged_attention.h"

#include "cpu_simd.h"
#include "cpu_threads.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace cai {
namespace {

using namespace simd;

constexpr int64_t kChunk = 64;  // keys scored before each softmax update

// scores[g * n + j] = q[g] . key j, for the n keys at rows[j] (q already scaled, fp32)
template <typename T>
inline void score(const float* q, const T* const* rows, int64_t n, int64_t group,
                                         int64_t dim, float* scores) {
  for (int64_t j = 0; j < n; ++j) {
    const T* key = rows[j];
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dim; ++d) s += qg[d] * to_f32(key[d]);
      scores[g * n + j] = s;
    }
  }
}

// acc[g] += sum_j weights[g * n + j] * value j
template <typename T>
inline void accumulate(float* acc, const float* weights, const T* const* rows, int64_t n,
                                              int64_t group, int64_t dim) {
  for (int64_t j = 0; j < n; ++j) {
    const T* value = rows[j];
    for (int64_t g = 0; g < group; ++g) {
      float* ag = acc + g * dim;
      const float w = weights[g * n + j];
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) ag[d] += w * to_f32(value[d]);
    }
  }
}

#ifdef CAI_AVX512
// [sum(v[0]), ..., sum(v[15])]: the 16 horizontal sums in 45 instructions, by halving twice
// within 128-bit lanes (unpack, shuffle) and twice across them (shuffle_f32x4)
CAI_V4 inline __m512 sums16(const __m512* v) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// 16 keys at a time: 16 lane-wise partial dot products (16 independent FMA chains, in registers),
// then their 16 sums at once; a last group of fewer keys repeats its first key and stores fewer
template <typename T>
CAI_V4 void score_avx512(const float* q, const T* const* rows, int64_t n, int64_t group, int64_t dim, float* scores) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t keys = std::min<int64_t>(16, n - j0);
    const T* key[16];
    for (int64_t j = 0; j < 16; ++j) key[j] = rows[j0 + (j < keys ? j : 0)];
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += 16) {
        const __m512 qd = _mm512_loadu_ps(qg + d);
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qd, load16(key[j] + d), acc[j]);
      }
      _mm512_mask_storeu_ps(scores + g * n + j0, static_cast<__mmask16>((1u << keys) - 1u), sums16(acc));
    }
  }
}

// The same for bf16 queries and keys with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and adds
// them into 16 fp32 lanes (no widening); the sums are scaled after (head_dim % 32 == 0)
CAI_V4_BF16 void score_dpbf16(const uint16_t* q, const uint16_t* const* rows, int64_t n, int64_t group, int64_t dim,
                              float scale, float* scores) {
  const __m512 times = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t keys = std::min<int64_t>(16, n - j0);
    const uint16_t* key[16];
    for (int64_t j = 0; j < 16; ++j) key[j] = rows[j0 + (j < keys ? j : 0)];
    for (int64_t g = 0; g < group; ++g) {
      const uint16_t* qg = q + g * dim;
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += 32) {
        const __m512bh qd = (__m512bh)_mm512_loadu_si512(qg + d);
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], qd, (__m512bh)_mm512_loadu_si512(key[j] + d));
      }
      _mm512_mask_storeu_ps(scores + g * n + j0, static_cast<__mmask16>((1u << keys) - 1u),
                            _mm512_mul_ps(sums16(acc), times));
    }
  }
}

// run(g0, G) for heads [g0, g0 + G) in groups of G = 4, then the rest (G a compile-time constant:
// the accumulators of a group live in registers)
template <typename Run>
inline void in_groups_of_four(int64_t heads, Run&& run) {
  int64_t g = 0;
  for (; g + 4 <= heads; g += 4) run(g, std::integral_constant<int, 4>{});
  switch (heads - g) {
    case 1: return run(g, std::integral_constant<int, 1>{});
    case 2: return run(g, std::integral_constant<int, 2>{});
    case 3: return run(g, std::integral_constant<int, 3>{});
    default: return;
  }
}

// acc[g] += sum_j weights[g * n + j] * value j for bf16 values with AVX512-BF16: the values of two
// keys interleaved column by column (pairs, once for all heads), the weights rounded to bf16 (as
// torch's CPU flash kernel rounds them for its second matmul), one vdpbf16ps per 16 columns a
// pair of keys; dim % 64 == 0 (the callers check), heads G <= 4 a call.
template <int G>
CAI_V4_BF16 void accumulate_pairs(float* acc, const uint16_t* weights, int64_t padded, const uint16_t* pairs,
                                  int64_t n_pairs, int64_t dim) {
  const int64_t slices = dim / 16;
  for (int64_t d = 0; d < dim; d += 64) {
    __m512 sum[G][4];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) sum[g][i] = _mm512_loadu_ps(acc + g * dim + d + 16 * i);
    for (int64_t jp = 0; jp < n_pairs; ++jp) {
      const uint16_t* pair = pairs + (jp * slices + d / 16) * 32;
      __m512bh v[4];
      for (int i = 0; i < 4; ++i) v[i] = (__m512bh)_mm512_loadu_si512(pair + 32 * i);
      for (int g = 0; g < G; ++g) {
        uint32_t w2;
        std::memcpy(&w2, weights + g * padded + 2 * jp, sizeof w2);
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(w2));
        for (int i = 0; i < 4; ++i) sum[g][i] = _mm512_dpbf16_ps(sum[g][i], v[i], w);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc + g * dim + d + 16 * i, sum[g][i]);
  }
}

struct PairScratch {  // the interleaved values and bf16 weights of a chunk
  std::vector<uint16_t> pairs, weights, zeros;
};

CAI_V4_BF16 void accumulate_dpbf16(float* acc, const float* weights, const uint16_t* const* rows, int64_t n,
                                   int64_t heads, int64_t dim, PairScratch& scratch) {
  static const uint16_t* order = [] {  // lane 2i: first key's column i, lane 2i + 1: the second key's
    static uint16_t lanes[32];
    for (int k = 0; k < 32; ++k) lanes[k] = static_cast<uint16_t>(k % 2 ? 16 + k / 2 : k / 2);
    return lanes;
  }();
  const __m512i interleave = _mm512_loadu_si512(order);
  const int64_t n_pairs = (n + 1) / 2, padded = 2 * n_pairs, slices = dim / 16;
  scratch.pairs.resize(n_pairs * dim * 2);
  scratch.weights.resize(heads * padded);
  scratch.zeros.assign(dim, 0);
  for (int64_t jp = 0; jp < n_pairs; ++jp) {
    const uint16_t* a = rows[2 * jp];
    const uint16_t* b = 2 * jp + 1 < n ? rows[2 * jp + 1] : scratch.zeros.data();
    for (int64_t c = 0; c < slices; ++c) {
      const __m512i both = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * c))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 * c)), 1);
      _mm512_storeu_si512(scratch.pairs.data() + (jp * slices + c) * 32, _mm512_permutexvar_epi16(interleave, both));
    }
  }
  for (int64_t g = 0; g < heads; ++g) {
    uint16_t* w = scratch.weights.data() + g * padded;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 part = static_cast<__mmask16>(n - j >= 16 ? 0xffff : (1u << (n - j)) - 1u);
      store16(w + j, _mm512_maskz_loadu_ps(part, weights + g * n + j), part);
    }
    if (n % 2) w[n] = 0;
  }
  in_groups_of_four(heads, [&](int64_t g, auto group) {
    accumulate_pairs<decltype(group)::value>(acc + g * dim, scratch.weights.data() + g * padded, padded,
                                             scratch.pairs.data(), n_pairs, dim);
  });
}

CAI_V4 float max_avx512(const float* x, int64_t n) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(x + i));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
    top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, x + i));
  }
  return _mm512_reduce_max_ps(top);
}

// scores[i] = exp(scores[i] - top) for i < n; returns their sum
CAI_V4 float exp_sum_avx512(float* scores, int64_t n, float top) {
  const __m512 shift = _mm512_set1_ps(top);
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + i), shift));
    _mm512_storeu_ps(scores + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + i), shift));
    _mm512_mask_storeu_ps(scores + i, tail, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// A group of G query heads (G <= 4): each value's 64 columns widened once and added into all G
// heads' accumulators, 4G independent FMA chains held in registers
template <typename T, int G>
CAI_V4 void accumulate_heads(float* acc, const float* weights, const T* const* rows, int64_t n, int64_t dim) {
  for (int64_t d = 0; d < dim; d += 64) {
    const int parts = static_cast<int>(std::min<int64_t>(4, (dim - d) / 16));
    __m512 sum[G][4];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < 4; ++i) sum[g][i] = i < parts ? _mm512_loadu_ps(acc + g * dim + d + 16 * i) : _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const T* value = rows[j] + d;
      __m512 v[4];
      for (int i = 0; i < 4; ++i) v[i] = i < parts ? load16(value + 16 * i) : _mm512_setzero_ps();
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(weights[g * n + j]);
        for (int i = 0; i < 4; ++i) sum[g][i] = _mm512_fmadd_ps(w, v[i], sum[g][i]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < parts; ++i) _mm512_storeu_ps(acc + g * dim + d + 16 * i, sum[g][i]);
  }
}

// Any number of query heads: groups of four, then the rest
template <typename T>
CAI_V4 void accumulate_avx512(float* acc, const float* weights, const T* const* rows, int64_t n, int64_t heads,
                              int64_t dim) {
  in_groups_of_four(heads, [&](int64_t g, auto group) {
    accumulate_heads<T, decltype(group)::value>(acc + g * dim, weights + g * n, rows, n, dim);
  });
}
#endif

// scores[i] = exp(scores[i] - top) for i < n; returns their sum
float exp_sum(float* scores, int64_t n, float top) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    scores[i] = std::exp(scores[i] - top);
    sum += scores[i];
  }
  return sum;
}

// Which loops a call runs: the AVX-512 ones where the CPU has them and head_dim % 16 == 0 (unless
// `portable`), else the plain ones (tests run both).
struct Loops {
  bool avx512;
  bool dpbf16;     // bf16 scores by vdpbf16ps (AVX512-BF16, head_dim % 32 == 0)
  bool pv_dpbf16;  // bf16 values by vdpbf16ps over pairs of keys (AVX512-BF16, head_dim % 64 == 0)
};

// Running softmax states of `heads` query heads: queries (fp32, scaled; and raw for vdpbf16ps),
// accumulated values, running max and sum
template <typename T>
struct States {
  std::vector<float> q, acc, top, total;
  std::vector<T> raw;
  States(int64_t heads, int64_t dim)
      : q(heads * dim), acc(heads * dim, 0.f), top(heads, -std::numeric_limits<float>::infinity()),
        total(heads, 0.f), raw(heads * dim) {}
};

// Continue the states of heads [h0, h0 + m) over the keys at positions [first, last) of `table`
// (kv head h), a chunk at a time: score, then the online softmax update, then the values.
template <typename T>
void attend_keys(const PagedDecode& a, int64_t h, const int64_t* table, int64_t first, int64_t last, States<T>& st,
                 int64_t h0, int64_t m, [[maybe_unused]] Loops loops) {
  const int64_t dim = a.head_dim, row = a.kv_heads * dim;
  const T* keys = static_cast<const T*>(a.k) + h * dim;
  const T* values = static_cast<const T*>(a.v) + h * dim;
  std::vector<float> scores(m * kChunk);
#ifdef CAI_AVX512
  PairScratch pair_scratch;
#endif
  const T* krows[kChunk];
  const T* vrows[kChunk];
  float* acc = st.acc.data() + h0 * dim;
  // the next chunk's keys and values (every head of their slots) are prefetched while this one
  // is computed: the pool is far larger than the caches, and a row's blocks are scattered in it
  const int64_t slot_bytes = row * static_cast<int64_t>(sizeof(T));
  // chunks end at multiples of kChunk counted from position 0, whatever `first` is: a key's chunk,
  // and so the order of a query's softmax updates, depends on its position only
  auto chunk_end = [&](int64_t start) { return std::min(last, (start / kChunk + 1) * kChunk); };
  auto prefetch = [&](int64_t start) {
    const int64_t n = chunk_end(start) - start;
    for (int64_t j = 0, block = start / a.block_size, offset = start % a.block_size; j < n; ++j) {
      const int64_t slot = table[block] * a.block_size + offset;
      const char* k = static_cast<const char*>(a.k) + slot * slot_bytes;
      const char* v = static_cast<const char*>(a.v) + slot * slot_bytes;
      for (int64_t byte = 0; byte < slot_bytes; byte += 64) {
        __builtin_prefetch(k + byte, 0, 2);
        __builtin_prefetch(v + byte, 0, 2);
      }
      if (++offset == a.block_size) offset = 0, ++block;
    }
  };
  if (first < last) prefetch(first);
  for (int64_t start = first, end = chunk_end(first); start < last; start = end, end = chunk_end(start)) {
    const int64_t n = end - start;
    for (int64_t j = 0, block = start / a.block_size, offset = start % a.block_size; j < n; ++j) {
      const int64_t slot = table[block] * a.block_size + offset;
      krows[j] = keys + slot * row;
      vrows[j] = values + slot * row;
      if (++offset == a.block_size) offset = 0, ++block;
    }
    if (end < last) prefetch(end);
#ifdef CAI_AVX512
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (loops.dpbf16) score_dpbf16(st.raw.data() + h0 * dim, krows, n, m, dim, a.scale, scores.data());
    }
    if (loops.dpbf16)
      ;
    else if (loops.avx512)
      score_avx512(st.q.data() + h0 * dim, krows, n, m, dim, scores.data());
    else
#endif
      score(st.q.data() + h0 * dim, krows, n, m, dim, scores.data());
    for (int64_t g = 0; g < m; ++g) {
      float* s = scores.data() + g * n;
      float& top = st.top[h0 + g];
      float& total = st.total[h0 + g];
#ifdef CAI_AVX512
      const float chunk_top = loops.avx512 ? max_avx512(s, n) : *std::max_element(s, s + n);
#else
      const float chunk_top = *std::max_element(s, s + n);
#endif
      const float new_top = std::max(top, chunk_top);
      const float rescale = std::exp(top - new_top);  // 0 on the first chunk (exp(-inf))
#ifdef CAI_AVX512
      const float sum = loops.avx512 ? exp_sum_avx512(s, n, new_top) : exp_sum(s, n, new_top);
#else
      const float sum = exp_sum(s, n, new_top);
#endif
      total = total * rescale + sum;
      top = new_top;
      float* ag = acc + g * dim;
      if (rescale != 1.f)
        for (int64_t d = 0; d < dim; ++d) ag[d] *= rescale;
    }
#ifdef CAI_AVX512
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (loops.pv_dpbf16) accumulate_dpbf16(acc, scores.data(), vrows, n, m, dim, pair_scratch);
    }
    if (loops.pv_dpbf16)
      ;
    else if (loops.avx512)
      accumulate_avx512(acc, scores.data(), vrows, n, m, dim);
    else
#endif
      accumulate(acc, scores.data(), vrows, n, m, dim);
  }
}

// Requests [r0, r1), kv heads [h0, h1): for each head, the shared leading keys once for all the
// requests' queries; then request by request, head by head, its own keys continuing its heads'
// states (a request's slots, all heads, stay in the cache from one head to the next)
template <typename T>
void one_task(const PagedDecode& a, int64_t r0, int64_t r1, int64_t h0, int64_t h1, Loops loops) {
  const int64_t group = a.q_heads / a.kv_heads, dim = a.head_dim, rows = r1 - r0, heads = h1 - h0;
  // the shared keys end on a chunk boundary, so that a query's chunks are the same with or without
  // them: its result does not depend on which other requests share its prefix (batch invariance)
  const int64_t shared = a.shared / kChunk * kChunk;
  States<T> st(heads * rows * group, dim);  // state i = ((h - h0) * rows + r) * group + g
  auto at = [&](int64_t h, int64_t r) { return ((h - h0) * rows + r) * group; };
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* q = static_cast<const T*>(a.q) + ((r0 + r) * a.q_heads + h * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) {
        st.raw[at(h, r) * dim + i] = q[i];
        st.q[at(h, r) * dim + i] = to_f32(q[i]) * a.scale;
      }
    }
    if (shared > 0) attend_keys(a, h, a.tables, 0, shared, st, at(h, 0), rows * group, loops);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t length = a.kv_lens[r0 + r];
    const int64_t first = a.window > 0 ? std::max<int64_t>(shared, length - a.window) : shared;
    for (int64_t h = h0; h < h1; ++h)
      attend_keys(a, h, a.tables + (r0 + r) * a.table_stride, first, length, st, at(h, r), group, loops);
  }
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t r = 0; r < rows; ++r) {
      T* out = static_cast<T*>(a.out) + ((r0 + r) * a.q_heads + h * group) * dim;
      for (int64_t g = 0; g < group; ++g) {
        const int64_t i = at(h, r) + g;
        const float inv = st.total[i] > 0.f ? 1.f / st.total[i] : 0.f;
        for (int64_t d = 0; d < dim; ++d) store(out, g * dim + d, st.acc[i * dim + d] * inv);
      }
    }
  }
}

struct Tasks {
  const PagedDecode* a;
  Loops loops;
  int64_t row_groups, head_groups;
  int64_t count() const { return row_groups * head_groups; }
  void run(int64_t t) const {  // task t: a share of the requests × a share of the kv heads
    const int64_t rows = t / head_groups, heads = t % head_groups;
    const int64_t r0 = a->batch * rows / row_groups, r1 = a->batch * (rows + 1) / row_groups;
    const int64_t h0 = a->kv_heads * heads / head_groups, h1 = a->kv_heads * (heads + 1) / head_groups;
    if (r0 == r1 || h0 == h1) return;
    if (a->dtype == AttnDType::bf16)
      one_task<uint16_t>(*a, r0, r1, h0, h1, loops);
    else
      one_task<float>(*a, r0, r1, h0, h1, loops);
  }
};

std::string check(const PagedDecode& a) {
  if (a.batch < 0 || a.q_heads <= 0 || a.kv_heads <= 0 || a.head_dim <= 0 || a.block_size <= 0)
    return "sizes must be positive";
  if (a.q_heads % a.kv_heads) return "q_heads must be a multiple of kv_heads";
  if (a.window < 0) return "window must be >= 0 (0: none)";
  if (a.shared < 0 || a.shared % a.block_size || (a.shared > 0 && a.window > 0))
    return "shared must be a whole number of blocks, and 0 with a window";
  for (int64_t r = 0; r < a.batch; ++r) {
    const int64_t length = a.kv_lens[r];
    const int64_t blocks = (length + a.block_size - 1) / a.block_size;
    if (length < 1 || blocks > a.table_stride)
      return "request " + std::to_string(r) + ": context length " + std::to_string(length) +
             " does not fit its block table of " + std::to_string(a.table_stride) + " blocks";
    if (a.shared >= length)
      return "request " + std::to_string(r) + ": the shared keys must end before its last position";
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t id = a.tables[r * a.table_stride + b];
      if (id < 0 || (id + 1) * a.block_size > a.num_slots)
        return "request " + std::to_string(r) + ": block id " + std::to_string(id) + " is outside the pool";
      if (b < a.shared / a.block_size && id != a.tables[b])
        return "request " + std::to_string(r) + ": its first shared blocks differ from request 0's";
    }
  }
  return "";
}

// y = x * cos + rotate_half(x) * sin for `heads` heads, each product and the sum rounded to T
// (the build has -ffp-contract=off: no fused multiply-add may skip the fp32 rounding either)
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, int64_t heads, int64_t dim, T* y) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h, x += dim, y += dim) {
    for (int64_t d = 0; d < dim; ++d) {
      const float turned = d < half ? -to_f32(x[d + half]) : to_f32(x[d - half]);
      const float a = rounded(to_f32(x[d]) * to_f32(cos[d]), T{});
      const float b = rounded(turned * to_f32(sin[d]), T{});
      store(y, d, rounded(a + b, T{}));
    }
  }
}

#ifdef CAI_AVX512
// rotate() 16 lanes at a time (head_dim % 32 == 0), the same roundings: bit for bit the same
template <typename T>
CAI_V4 void rotate_avx512(const T* x, const T* cos, const T* sin, int64_t heads, int64_t dim, T* y) {
  const int64_t half = dim / 2;
  const __m512 sign = _mm512_set1_ps(-0.f);
  for (int64_t h = 0; h < heads; ++h, x += dim, y += dim) {
    for (int64_t d = 0; d < half; d += 16) {
      const __m512 first = load16(x + d), second = load16(x + d + half);
      const __m512 low = _mm512_add_ps(rounded16(_mm512_mul_ps(first, load16(cos + d)), T{}),
                                       rounded16(_mm512_mul_ps(_mm512_xor_ps(second, sign), load16(sin + d)), T{}));
      const __m512 high = _mm512_add_ps(rounded16(_mm512_mul_ps(second, load16(cos + d + half)), T{}),
                                        rounded16(_mm512_mul_ps(first, load16(sin + d + half)), T{}));
      store16(y + d, low);  // store16 rounds to T
      store16(y + d + half, high);
    }
  }
}
#endif

// Rotate the new tokens: q into `q_out` [batch, q_heads, head_dim], k (and v as is) into the pool;
// the requests shared among torch's threads
template <typename T>
void rotate_and_store(const PagedDecode& a, const NewTokens& t, T* q_out, [[maybe_unused]] bool vector) {
  const int64_t dim = a.head_dim, row = a.kv_heads * dim;
  auto turn = [&](const T* x, const T* cos, const T* sin, int64_t heads, T* y) {
#ifdef CAI_AVX512
    if (vector) return rotate_avx512(x, cos, sin, heads, dim, y);
#endif
    rotate(x, cos, sin, heads, dim, y);
  };
  const int64_t shares = std::min(gomp().threads(), a.batch);
  parallel_tasks(shares, [&](int64_t share) {
    for (int64_t r = a.batch * share / shares; r < a.batch * (share + 1) / shares; ++r) {
      const int64_t last = a.kv_lens[r] - 1;
      const int64_t slot = a.tables[r * a.table_stride + last / a.block_size] * a.block_size + last % a.block_size;
      const T* cos = static_cast<const T*>(t.cos) + r * dim;
      const T* sin = static_cast<const T*>(t.sin) + r * dim;
      turn(static_cast<const T*>(t.q) + r * t.q_stride, cos, sin, a.q_heads, q_out + r * a.q_heads * dim);
      turn(static_cast<const T*>(t.k) + r * t.kv_stride, cos, sin, a.kv_heads, static_cast<T*>(a.k) + slot * row);
      std::memcpy(static_cast<T*>(a.v) + slot * row, static_cast<const T*>(t.v) + r * t.kv_stride, row * sizeof(T));
    }
  });
}

template <typename T>
std::vector<T> rotated(PagedDecode& a, const NewTokens& t, bool vector) {
  std::vector<T> q(a.batch * a.q_heads * a.head_dim);
  rotate_and_store(a, t, q.data(), vector);
  a.q = q.data();
  return q;
}

}  // namespace

std::string paged_decode_attention(const PagedDecode& given, const NewTokens* fresh, bool portable) {
  std::string error = check(given);
  if (!error.empty()) return error;
  if (fresh && given.head_dim % 2) return "the rotary embedding needs an even head_dim";
  PagedDecode a = given;
  Loops loops{false, false, false};
#ifdef CAI_AVX512
  loops.avx512 = !portable && a.head_dim % 16 == 0 && has_avx512();
  loops.dpbf16 = loops.avx512 && a.dtype == AttnDType::bf16 && a.head_dim % 32 == 0 &&
                 __builtin_cpu_supports("avx512bf16");
  loops.pv_dpbf16 = loops.dpbf16 && a.head_dim % 64 == 0;
#else
  (void)portable;
#endif
  const bool rotate_vector = loops.avx512 && a.head_dim % 32 == 0;
  std::vector<uint16_t> q16;
  std::vector<float> q32;
  if (fresh && a.dtype == AttnDType::bf16) q16 = rotated<uint16_t>(a, *fresh, rotate_vector);
  if (fresh && a.dtype == AttnDType::f32) q32 = rotated<float>(a, *fresh, rotate_vector);
  // tasks: the requests in one share a thread (each share reads the shared keys for its own
  // requests' queries); where there are fewer requests than threads, shares of the kv heads too
  const int64_t threads = gomp().threads();
  const int64_t row_groups = std::max<int64_t>(1, std::min(a.batch, threads));
  const int64_t head_groups = std::min(a.kv_heads, (threads + row_groups - 1) / row_groups);
  const Tasks tasks{&a, loops, row_groups, head_groups};
  parallel_tasks(tasks.count(), [&](int64_t t) { tasks.run(t); });
  return "";
}

}  // namespace cai
