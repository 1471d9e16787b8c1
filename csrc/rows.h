// Row-wise CPU kernels of the decoder layer that torch runs as several small ops each: residual
// add + RMSNorm, and SiLU(gate) * up; and greedy sampling's argmax over a step's logits. Plain C++ (no libtorch): the binding passes addresses.
// Their twins are transformers' LlamaRMSNorm and LlamaMLP's act_fn(gate) * up; tests/test_rows.py
// holds them together.
#pragma once

#include <cstdint>
#include <string>

namespace cai {

enum class RowDType : int { f32 = 0, bf16 = 1 };

// x [rows, width] += delta (when delta is not null, rounded to the dtype as torch's add), then
// out = weight * to_dtype(x * rsqrt(mean(x^2) + eps)) with the mean and the scaling in fp32 and
// the product with weight rounded to the dtype, as LlamaRMSNorm computes it.
// portable (all three): the plain loops even where the AVX-512 ones could run (for tests). Each
// kernel shares its rows among torch's threads (add_rms_norm and silu_mul: 4 rows a thread at least).
std::string add_rms_norm(void* x, const void* delta, const void* weight, void* out, int64_t rows, int64_t width,
                         float eps, RowDType dtype, bool portable = false);

// out [rows, width] = silu(gate_up[:, :width]) * gate_up[:, width:], each op rounded to the dtype
// as torch's silu then mul; gate_up rows are 2 * width apart.
std::string silu_mul(const void* gate_up, void* out, int64_t rows, int64_t width, RowDType dtype,
                     bool portable = false);

// out[r] = the first index of row r's maximum of x [rows, width], a NaN counting as the maximum
// (torch.argmax's answer), the rows shared among torch's threads.
std::string argmax_rows(const void* x, int64_t rows, int64_t width, RowDType dtype, int64_t* out,
                        bool portable = false);

}  // namespace cai
