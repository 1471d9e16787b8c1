"""A matrix product whose rows do not depend on how many rows come with them (batch invariance).

torch's fp32 CPU GEMM takes other kernels, with other roundings, for calls of fewer than 12 rows
(measured on AMD EPYC with AVX-512, under every ATEN_CPU_CAPABILITY): such calls are padded with
zero rows to INVARIANT_ROWS. bf16 calls (oneDNN) and calls off the CPU go to F.linear as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INVARIANT_ROWS = 16


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., K], weight [N, K], bias [N]) -> [..., N], each row as in a call of many rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not (x.is_cpu and x.dtype == torch.float32 and 0 < rows < INVARIANT_ROWS):
        return F.linear(x, weight, bias)
    padded = x.new_zeros(INVARIANT_ROWS, x.shape[-1])
    padded[:rows] = x.reshape(rows, -1)
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])
