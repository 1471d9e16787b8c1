// A bf16 linear layer for a decode step's few rows on CPUs with AMX (Intel Sapphire Rapids and
// later): y [m, n] = x [m, k] @ w [n, k]^T (+ bias), bf16 in and out, fp32 sums in AMX tiles,
// rounded once (bias added in fp32 first), as oneDNN's bf16 linear rounds. The weight is packed
// once, at load, into the tiles' layout so that a step streams it from memory in one pass.
// Plain C++ (no libtorch): the binding passes addresses. Its twin is torch's F.linear (oneDNN);
// tests/test_linear.py holds them together.
#pragma once

#include <cstdint>
#include <string>

namespace cai {

// Whether this CPU has AMX-TILE, AMX-BF16 and AVX-512 and the OS let this process use the tiles
// (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, asked once).
bool has_amx_bf16();

// The packed layout of w [n, k] (n and k multiples of 32): blocks of 32 output columns, each a run
// of k / 32 steps of two 16 x 16 B tiles (columns 0-15, then 16-31), a tile row holding the 16
// columns' (even k, odd k) pairs: packed[((b * k/32 + s) * 2 + h) * 512 + r * 32 + c * 2 + j] =
// w[(32 b + 16 h + c) * k + 32 s + 2 r + j]. Same size as w.
std::string pack_linear_weight(const uint16_t* w, int64_t n, int64_t k, uint16_t* packed);

// y [m, n] (rows n apart) = x [m, k] (rows k apart) @ w^T + bias [n] (null: none), w packed as
// above; the 32-column blocks are shared among torch's threads.
std::string amx_linear(const uint16_t* x, int64_t m, int64_t k, const uint16_t* packed, int64_t n,
                       const uint16_t* bias, uint16_t* y);

}  // namespace cai
