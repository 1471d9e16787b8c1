// Decode attention on a CPU straight from the paged KV pool: one new token a request, its keys
// read in place through its block table (no gathered copy, no packing), fp32 accumulation.
// A query's result depends on its own keys only: chunks of keys end at fixed positions and the
// shared keys are cut to whole chunks, so it is bit-identical whatever else is in the batch (the
// engine's prefill runs a row a new token through it for that reason).
// Plain C++ (no libtorch, no Python): the binding passes addresses and sizes as integers.
// Its twin is cai_fast.engine.attention's torch path; tests/test_cpu_decode_kernel.py holds them
// together.
#pragma once

#include <cstdint>
#include <string>

namespace cai {

enum class AttnDType : int { f32 = 0, bf16 = 1 };

struct PagedDecode {
  const void* q;          // [batch, q_heads, head_dim], dtype, contiguous
  void* out;              // same shape and dtype as q
  void* k;                // the layer's pool: [slots, kv_heads, head_dim], dtype, contiguous (written
  void* v;                // only with NewTokens)
  const int64_t* tables;  // [batch, table_stride] block ids (a row may be padded past its blocks)
  int64_t table_stride;
  const int64_t* kv_lens; // [batch] context lengths, the new token included (>= 1)
  int64_t batch, q_heads, kv_heads, head_dim, block_size;
  int64_t window;         // 0: full attention; else a key at k is seen from p when p - window < k <= p
  int64_t shared;         // leading keys in the same blocks of every table (whole blocks, before every
                          // request's last position; 0 with a window): scored once for all requests' queries
  float scale;
  AttnDType dtype;
  int64_t num_slots;      // slots in the pool: a table entry out of range is an error
};

// The batch's new tokens before the rotary embedding, for the kernel to rotate (as transformers'
// apply_rotary_pos_emb does, rounding to the dtype after each multiply and add) and store: k and v
// at the pool slot of each request's last position, q for the attention. PagedDecode.q is unused.
struct NewTokens {
  const void* q;          // [batch, q_heads, head_dim], rows q_stride elements apart
  const void* k;          // [batch, kv_heads, head_dim], rows kv_stride elements apart
  const void* v;
  int64_t q_stride, kv_stride;
  const void* cos;        // [batch, head_dim], contiguous
  const void* sin;
};

// Runs the attention of every (request, kv head) pair, after rotating and storing `fresh` where
// given; returns "" or what is wrong with the args. portable: the plain loops even where the
// AVX-512 ones could run (for tests).
std::string paged_decode_attention(const PagedDecode& a, const NewTokens* fresh = nullptr, bool portable = false);

}  // namespace cai
