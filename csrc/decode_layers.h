// A bf16 decode step's decoder layers in one call, on CPUs with AMX: each layer's residual add and
// RMSNorm (rows.h), q|k|v projection (linear.h), rotary embedding, pool write and paged attention
// (paged_attention.h), o projection, second add and norm, gate|up projection, SiLU(gate) * up and
// down projection, then the final norm; the same kernels, in the same order and with the same
// roundings, as cai_fast.engine.model_runner's eager step calls them one by one from Python.
// Plain C++ (no libtorch): the binding passes addresses. Its twin is that eager step;
// tests/test_decode_layers.py holds the two together, bit for bit.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cai {

// One decoder layer as the engine holds it: RMSNorm weights [hidden], projections packed by
// pack_linear_weight (q|k|v [(q_heads + 2 kv_heads) head_dim, hidden], o [hidden, q_heads head_dim],
// gate|up [2 inter, hidden], down [hidden, inter]) with their biases (null: none), and the
// layer's KV pool [slots, kv_heads, head_dim] with its attention window (0: full attention).
struct DecodeLayer {
  const uint16_t* input_norm;
  float input_eps;
  const uint16_t *qkv, *qkv_bias, *o, *o_bias;
  const uint16_t* post_norm;
  float post_eps;
  const uint16_t *gate_up, *gate_up_bias, *down, *down_bias;
  void *k_pool, *v_pool;
  int64_t window;
};

struct DecodeModel {
  std::vector<DecodeLayer> layers;
  const uint16_t* final_norm;
  float final_eps;
  int64_t hidden, inter, q_heads, kv_heads, head_dim, block_size, num_slots;
  float scale;
};

// One decode step of `rows` requests: x [rows, hidden] (the embedded new tokens; left holding the
// residual stream before the last MLP output) through every layer into out [rows, hidden] (the
// final norm's output). tables [rows, table_stride] and kv_lens [rows] as PagedDecode takes them
// (kv_lens count the new token), cos and sin [rows, head_dim] the rotary tables of each row's
// position, shared [layers] the leading keys every table holds in the same blocks for each
// layer's window. Returns "" or what is wrong.
std::string decode_layers(const DecodeModel& model, uint16_t* x, int64_t rows, const int64_t* tables,
                          int64_t table_stride, const int64_t* kv_lens, const uint16_t* cos, const uint16_t* sin,
                          const int64_t* shared, uint16_t* out);

}  // namespace cai
