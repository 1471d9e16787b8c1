// See linear.h. Each thread takes a run of 32-column blocks (their packed weights are contiguous,
// so a thread streams one stretch of memory) and, for each block and each block of up to 32 rows,
// sums k / 32 steps of [rows x 32] @ [32 x 32] in four C tiles (rows 0-15 / 16-31 x columns
// 0-15 / 16-31), then adds the bias and rounds the fp32 sums to bf16 with AVX-512.
#include "linear.h"

#include "cpu_simd.h"
#include "cpu_threads.h"

#include <algorithm>
#include <string>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace cai {
namespace {

using namespace simd;

constexpr int64_t kBlock = 32;         // output columns a block, rows a row block, k a step
constexpr int64_t kTile = 16 * 32;     // bf16 elements of a B tile (16 rows of 64 bytes)
constexpr int64_t kAhead = 3;  // blocks between the one computed and the one prefetched
constexpr int64_t kGroupBytes = 512 * 1024;  // packed weights a thread keeps in its L2 across row blocks

std::string check_shapes(int64_t n, int64_t k) {
  if (n <= 0 || k <= 0 || n % kBlock || k % kBlock)
    return "n and k must be positive multiples of 32 (got n=" + std::to_string(n) + ", k=" + std::to_string(k) + ")";
  return "";
}

#ifdef CAI_AVX512
#define CAI_AMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma,bmi2,amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: C (row half 0/1 x column half 0/1), 4-5: A (row halves), 6-7: B (column halves);
// the second row half's tiles are left unconfigured when the block has 16 rows or fewer
CAI_AMX void configure(int64_t rows) {
  TileConfig c;
  const int64_t top = rows < 16 ? rows : 16, bottom = rows - top;
  for (int t : {0, 1, 4}) c.rows[t] = static_cast<uint8_t>(top), c.colsb[t] = 64;
  if (bottom)
    for (int t : {2, 3, 5}) c.rows[t] = static_cast<uint8_t>(bottom), c.colsb[t] = 64;
  for (int t : {6, 7}) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// sums [32 x 32] fp32 (rows 128 bytes apart) = x rows [rows, k] @ one column block's packed w;
// `ahead` (or null): a later block's packed weights, prefetched a step at a time (1.1-1.3x a
// decode step's linears at 32 rows on this CPU, none at 1)
template <bool kTwoHalves>
CAI_AMX void block_sums(const uint16_t* x, int64_t k, const uint16_t* w, const uint16_t* ahead, float* sums) {
  const int64_t stride = k * 2;
  _tile_zero(0);
  _tile_zero(1);
  if (kTwoHalves) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < k / kBlock; ++s, w += 2 * kTile) {
    if (ahead)  // this step's 2 KB of a later block, into L2: memory is read while the tiles compute
      for (int64_t line = 0; line < 2 * kTile * 2; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + s * 2 * kTile) + line, _MM_HINT_T1);
    _tile_loadd(6, w, 64);
    _tile_loadd(7, w + kTile, 64);
    _tile_loadd(4, x + s * kBlock, stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwoHalves) {
      _tile_loadd(5, x + 16 * k + s * kBlock, stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, sums, 128);
  _tile_stored(1, sums + 16, 128);
  if (kTwoHalves) {
    _tile_stored(2, sums + 16 * kBlock, 128);
    _tile_stored(3, sums + 16 * kBlock + 16, 128);
  }
}

// y rows [rows, 32] of one column block = sums + bias, rounded to bf16
CAI_AMX void write_block(const float* sums, const uint16_t* bias, int64_t rows, int64_t n, uint16_t* y) {
  const __m512 b0 = bias ? load16(bias) : _mm512_setzero_ps(), b1 = bias ? load16(bias + 16) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i, sums += kBlock, y += n) {
    store16(y, _mm512_add_ps(_mm512_loadu_ps(sums), b0));
    store16(y + 16, _mm512_add_ps(_mm512_loadu_ps(sums + 16), b1));
  }
}

// one thread's share: column blocks [b0, b1), a group of them at a time whose packed weights fit
// in the core's L2 (kGroupBytes), each group for every row block: the weights are read from
// memory once however many rows there are (prefill), and a decode step's few rows (one row
// block) stream them in one pass
CAI_AMX void share(const uint16_t* x, int64_t m, int64_t k, const uint16_t* packed, int64_t n, const uint16_t* bias,
                   uint16_t* y, int64_t b0, int64_t b1) {
  alignas(64) float sums[kBlock * kBlock];
  const int64_t group = std::max<int64_t>(1, kGroupBytes / (kBlock * k * 2));
  int64_t configured = -1;
  for (int64_t g0 = b0; g0 < b1; g0 += group) {
    const int64_t g1 = std::min(b1, g0 + group);
    for (int64_t r = 0; r < m; r += kBlock) {
      const int64_t rows = std::min(kBlock, m - r);
      if (rows != configured) configure(rows), configured = rows;
      for (int64_t b = g0; b < g1; ++b) {
        const uint16_t* w = packed + b * kBlock * k;  // the block's k / 32 steps of two tiles
        const uint16_t* ahead = r == 0 && b + kAhead < b1 ? w + kAhead * kBlock * k : nullptr;
        if (rows > 16)
          block_sums<true>(x + r * k, k, w, ahead, sums);
        else
          block_sums<false>(x + r * k, k, w, ahead, sums);
        write_block(sums, bias ? bias + b * kBlock : nullptr, rows, n, y + r * n + b * kBlock);
      }
    }
  }
  if (configured >= 0) _tile_release();
}
#endif

}  // namespace

bool has_amx_bf16() {
#if defined(CAI_AVX512) && defined(__linux__)
  static const bool ready = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tiles = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;  // AMX-TILE, AMX-BF16
    // ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): Linux hands out the tile state
    // only to a process that asks (oneDNN asks too; asking twice is harmless)
    return tiles && bf16 && simd::has_avx512() && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

std::string pack_linear_weight(const uint16_t* w, int64_t n, int64_t k, uint16_t* packed) {
  if (std::string error = check_shapes(n, k); !error.empty()) return error;
  const int64_t steps = k / kBlock;
  for (int64_t b = 0; b < n / kBlock; ++b)
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t c = 0; c < 16; ++c)
            for (int64_t j = 0; j < 2; ++j)
              packed[((b * steps + s) * 2 + h) * kTile + r * 32 + c * 2 + j] =
                  w[(kBlock * b + 16 * h + c) * k + kBlock * s + 2 * r + j];
  return "";
}

std::string amx_linear(const uint16_t* x, int64_t m, int64_t k, const uint16_t* packed, int64_t n,
                       const uint16_t* bias, uint16_t* y) {
  if (std::string error = check_shapes(n, k); !error.empty()) return error;
  if (m < 0) return "m must be >= 0";
  if (!has_amx_bf16()) return "this CPU (or its OS) offers no AMX-BF16 tiles";
#ifdef CAI_AVX512
  const int64_t blocks = n / kBlock;
  const int64_t shares = std::min(gomp().threads(), blocks);
  parallel_tasks(shares, [&](int64_t t) {
    share(x, m, k, packed, n, bias, y, blocks * t / shares, blocks * (t + 1) / shares);
  });
#else
  (void)x, (void)packed, (void)bias, (void)y;
#endif
  return "";
}

}  // namespace cai
