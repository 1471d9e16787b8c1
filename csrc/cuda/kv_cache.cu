// Paged KV-pool kernels (see kv_cache.h). Each block of threads moves one row (store_kv) or one
// (tensor, block) pair (zero_blocks), 16 bytes a thread-step when the addresses allow, else bytes.
#include "kv_cache.h"

#include <cuda_runtime.h>

namespace cai {
namespace {

constexpr int kThreads = 128;

__device__ bool aligned16(const void* p, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (bytes % 16 == 0);
}

__device__ void copy_row(char* dst, const char* src, int64_t bytes) {
  if (aligned16(dst, bytes) && aligned16(src, 0)) {
    auto* d = reinterpret_cast<uint4*>(dst);
    auto* s = reinterpret_cast<const uint4*>(src);
    for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
  }
}

__device__ void zero_row(char* dst, int64_t bytes) {
  if (aligned16(dst, bytes)) {
    auto* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = 0;
  }
}

// grid (n, 2): blockIdx.y picks K (0) or V (1).
__global__ void store_kv_kernel(const char* k_src, const char* v_src, int64_t src_stride, char* k_dst, char* v_dst,
                                int64_t dst_stride, const int64_t* slots, int64_t row_bytes) {
  const int64_t i = blockIdx.x;
  const char* src = (blockIdx.y == 0 ? k_src : v_src) + i * src_stride;
  char* dst = (blockIdx.y == 0 ? k_dst : v_dst) + slots[i] * dst_stride;
  copy_row(dst, src, row_bytes);
}

// grid (n, num_tensors).
__global__ void zero_blocks_kernel(const uint64_t* bases, const int64_t* blocks, int64_t block_bytes) {
  char* base = reinterpret_cast<char*>(bases[blockIdx.y]);
  zero_row(base + blocks[blockIdx.x] * block_bytes, block_bytes);
}

std::string status() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace

std::string store_kv(uint64_t k_src, uint64_t v_src, int64_t src_stride, uint64_t k_dst, uint64_t v_dst,
                     int64_t dst_stride, uint64_t slots, int64_t n, int64_t row_bytes, uint64_t stream) {
  if (n == 0) return "";
  store_kv_kernel<<<dim3(static_cast<unsigned>(n), 2), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const char*>(k_src), reinterpret_cast<const char*>(v_src), src_stride,
      reinterpret_cast<char*>(k_dst), reinterpret_cast<char*>(v_dst), dst_stride,
      reinterpret_cast<const int64_t*>(slots), row_bytes);
  return status();
}

std::string zero_blocks(uint64_t bases, int64_t num_tensors, uint64_t blocks, int64_t n, int64_t block_bytes,
                        uint64_t stream) {
  if (n == 0 || num_tensors == 0) return "";
  zero_blocks_kernel<<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(num_tensors)), kThreads, 0,
                       reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const uint64_t*>(bases), reinterpret_cast<const int64_t*>(blocks), block_bytes);
  return status();
}

}  // namespace cai
