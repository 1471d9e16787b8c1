"""Row kernels of cai_fast._core for the paged runner's decoder layers on a CPU (csrc/rows.cpp).

- `add_rms_norm`: the residual add and the next RMSNorm in one call, rounded as LlamaRMSNorm
  rounds (its fp32 squares summed in double, so an output may differ in the last bit now and then);
- `silu_mul`: SiLU(gate) * up of the fused gate|up output, one rounding for any number of rows;
- `argmax`: greedy sampling's argmax over a step's logits rows.
AVX-512 and plain loops, rows shared among torch's threads. Their twins are the model's modules
and torch.argmax; `takes_*` says where a kernel applies (a plain RMSNorm or SiLU, a CPU tensor
in fp32 or bf16).
"""

from __future__ import annotations

import torch

from .attention import CPU_KERNEL_DTYPES as DTYPES  # the same codes as the decode kernel's
from .._native import HAVE_ROW_KERNELS, _core
from . import cpu_paths

RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")  # forward: weight * to_dtype(x * rsqrt(mean(x^2) + eps))


def takes_norm(norm, x: torch.Tensor) -> bool:
    """Whether `add_rms_norm` computes `norm` of x."""
    return (HAVE_ROW_KERNELS and type(norm).__name__ in RMS_NORMS and x.is_cpu and x.dtype in DTYPES
            and norm.weight.dtype == x.dtype and x.dim() == 2 and x.is_contiguous())


def takes_silu_mul(act, gate_up: torch.Tensor) -> bool:
    """Whether `silu_mul` computes act(gate) * up of this gate|up output."""
    return (HAVE_ROW_KERNELS and type(act).__name__ in ("SiLU", "SiLUActivation") and gate_up.is_cpu
            and gate_up.dtype in DTYPES and gate_up.dim() == 2 and gate_up.is_contiguous())


def takes_argmax(x: torch.Tensor) -> bool:
    """Whether `argmax` computes torch.argmax(x, -1) of these [rows, width] logits."""
    return HAVE_ROW_KERNELS and x.is_cpu and x.dtype in DTYPES and x.dim() == 2 and x.shape[1] > 0 and x.is_contiguous()


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, norm, portable: bool | None = None) -> torch.Tensor:
    """x += delta in place (rounded to x's dtype, as torch's add), then norm(x), by the kernel
    (`portable`: its plain loops even where its AVX-512 ones could run; None: as CAI_FAST_CPU says)."""
    if delta is not None:
        delta = delta.contiguous()
        if delta.shape != x.shape or delta.dtype != x.dtype:
            raise ValueError(f"add_rms_norm: delta {tuple(delta.shape)} {delta.dtype} does not match x "
                             f"{tuple(x.shape)} {x.dtype}")
    out = torch.empty_like(x)
    _core.add_rms_norm(x.data_ptr(), 0 if delta is None else delta.data_ptr(), norm.weight.data_ptr(),
                       out.data_ptr(), x.shape[0], x.shape[1], norm.variance_epsilon, DTYPES[x.dtype],
                       cpu_paths.portable(portable))
    return out


def silu_mul(gate_up: torch.Tensor, portable: bool | None = None) -> torch.Tensor:
    """silu(gate) * up of gate_up [n, 2 * width] (gate first), by the kernel (`portable`: as above)."""
    width = gate_up.shape[1] // 2
    out = gate_up.new_empty(gate_up.shape[0], width)
    _core.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], width, DTYPES[gate_up.dtype],
                  cpu_paths.portable(portable))
    return out


def argmax(x: torch.Tensor, portable: bool | None = None) -> torch.Tensor:
    """torch.argmax(x, -1) of x [rows, width] (int64; the first maximum, a NaN counting as the
    maximum), by the kernel (`portable`: as above)."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _core.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], DTYPES[x.dtype], out.data_ptr(), cpu_paths.portable(portable))
    return out
