"""A matrix product whose rows do not depend on how many rows come with them (batch invariance).

torch's CPU GEMMs take other kernels, with other roundings, for other row counts: fp32 calls of
fewer than 12 rows (AMD EPYC with AVX-512, under every ATEN_CPU_CAPABILITY) and of 57-130 rows at
K = 1,536 (an Intel Xeon with AMX); there oneDNN's bf16 kernels too, at nearly every count from 1
to 200 (SmolLM2's down projection). A call of a fixed number of rows gives each row the same
result wherever it lies in it, so CPU calls run in blocks of FP32_ROWS rows (fp32) or HALF_ROWS
(bf16/fp16 on a CPU with AMX tiles), the last one padded with zero rows: a call of fewer rows as one
block always, a larger one in blocks where autograd records nothing (the engine's generation and
scoring, evaluation); a larger call that autograd records (training, where batch invariance is not
promised and the blocks would cost) goes whole. bf16 without AMX (oneDNN: invariant at every count
tried) and calls off the CPU go to F.linear as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP32_ROWS = 16
HALF_ROWS = 64


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x [..., K], weight [N, K], bias [N]) -> [..., N], each row the same whatever rows come with it."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    block = _block_rows(x) if rows and x.is_cpu else 0
    if not block or (rows > block and torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    padded = x.new_zeros(-(-rows // block) * block, x.shape[-1])
    padded[:rows] = x.reshape(rows, -1)
    out = torch.cat([F.linear(part, weight, bias) for part in padded.split(block)])
    return out[:rows].reshape(*x.shape[:-1], weight.shape[0])


def _block_rows(x: torch.Tensor) -> int:
    if x.dtype == torch.float32:
        return FP32_ROWS
    return HALF_ROWS if x.dtype in (torch.bfloat16, torch.float16) and amx_cpu() else 0


def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles (which oneDNN then uses)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
