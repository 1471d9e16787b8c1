// See decode_layers.h. Every intermediate lives in buffers made once a call; each kernel runs on
// torch's threads as it does when Python calls it.
#include "decode_layers.h"

#include "linear.h"
#include "paged_attention.h"
#include "rows.h"

namespace cai {

std::string decode_layers(const DecodeModel& model, uint16_t* x, int64_t rows, const int64_t* tables,
                          int64_t table_stride, const int64_t* kv_lens, const uint16_t* cos, const uint16_t* sin,
                          const int64_t* shared, uint16_t* out) {
  if (rows < 0) return "rows must be >= 0";
  if (rows == 0) return "";
  const int64_t hidden = model.hidden, attn_width = model.q_heads * model.head_dim;
  const int64_t qkv_width = attn_width + 2 * model.kv_heads * model.head_dim;
  std::vector<uint16_t> h(rows * hidden), delta(rows * hidden), qkv(rows * qkv_width), attn(rows * attn_width),
      gate_up(rows * 2 * model.inter), act(rows * model.inter);
  const uint16_t* residual = nullptr;  // each layer's last output, added to x by the next norm
  std::string error;
  auto failed = [&](const char* what, std::string e) {
    if (!e.empty()) error = std::string(what) + ": " + e;
    return !error.empty();
  };
  for (size_t i = 0; i < model.layers.size(); ++i) {
    const DecodeLayer& l = model.layers[i];
    if (failed("input norm", add_rms_norm(x, residual, l.input_norm, h.data(), rows, hidden, l.input_eps,
                                          RowDType::bf16)) ||
        failed("q|k|v", amx_linear(h.data(), rows, hidden, l.qkv, qkv_width, l.qkv_bias, qkv.data())))
      return "layer " + std::to_string(i) + " " + error;
    const PagedDecode a{nullptr, attn.data(), l.k_pool, l.v_pool, tables, table_stride, kv_lens, rows,
                        model.q_heads, model.kv_heads, model.head_dim, model.block_size, l.window, shared[i],
                        model.scale, AttnDType::bf16, model.num_slots};
    const NewTokens fresh{qkv.data(), qkv.data() + attn_width, qkv.data() + attn_width + model.kv_heads * model.head_dim,
                          qkv_width, qkv_width, cos, sin};
    if (failed("attention", paged_decode_attention(a, &fresh)) ||
        failed("o", amx_linear(attn.data(), rows, attn_width, l.o, hidden, l.o_bias, delta.data())) ||
        failed("post-attention norm", add_rms_norm(x, delta.data(), l.post_norm, h.data(), rows, hidden, l.post_eps,
                                                   RowDType::bf16)) ||
        failed("gate|up", amx_linear(h.data(), rows, hidden, l.gate_up, 2 * model.inter, l.gate_up_bias,
                                     gate_up.data())) ||
        failed("silu", silu_mul(gate_up.data(), act.data(), rows, model.inter, RowDType::bf16)) ||
        failed("down", amx_linear(act.data(), rows, model.inter, l.down, hidden, l.down_bias, delta.data())))
      return "layer " + std::to_string(i) + " " + error;
    residual = delta.data();
  }
  if (failed("final norm", add_rms_norm(x, residual, model.final_norm, out, rows, hidden, model.final_eps,
                                        RowDType::bf16)))
    return error;
  return "";
}

}  // namespace cai
