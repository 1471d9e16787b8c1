// Paged KV-pool kernels on CUDA: writing new tokens' K/V into their slots and zeroing blocks.
// No libtorch: tensors arrive as device addresses, sizes and strides (in bytes), the stream as an
// integer (0 = the legacy default stream). Data type agnostic: rows are copied as bytes. Each
// function launches asynchronously on `stream` and returns "" or the CUDA error's text.
#pragma once

#include <cstdint>
#include <string>

namespace cai {

// For i < n: dst[slots[i]] = src[i], for K and V of one layer. A row is row_bytes bytes (kv_heads ×
// head_dim × element size, contiguous); src rows are src_stride apart, the pool's dst_stride apart.
// slots: int64 device array of n slot ids.
std::string store_kv(uint64_t k_src, uint64_t v_src, int64_t src_stride, uint64_t k_dst, uint64_t v_dst,
                     int64_t dst_stride, uint64_t slots, int64_t n, int64_t row_bytes, uint64_t stream);

// For every one of num_tensors tensors (device array `bases` of their addresses) and each of the
// n block ids in `blocks` (int64 device array): zero block_bytes bytes at base + id * block_bytes.
std::string zero_blocks(uint64_t bases, int64_t num_tensors, uint64_t blocks, int64_t n, int64_t block_bytes,
                        uint64_t stream);

}  // namespace cai
