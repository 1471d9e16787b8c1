"""The AMX linear of cai_fast._core (csrc/linear.cpp): bf16 projections on CPUs with AMX tiles.

Each weight is packed once into the tiles' layout; each of torch's threads computes one stretch
of it, prefetching ahead into L2, summing in fp32 tiles and rounding once to bf16 (bias added
first), as oneDNN does; each row's result is the same whatever rows come with it (batch
invariance). `FusedLinear` calls it for every row count where it is taken; the C++ decode loop
(decode_layers) for decode steps of up to MAX_ROWS rows. Taken
where `takes` says (an AMX-BF16 CPU, bf16 weights whose sizes are multiples of 32); its twin is
oneDNN's linear (`EngineConfig.linear="onednn"`), held to it by tests/test_linear.py.
"""

from __future__ import annotations

import torch

from .._native import HAVE_AMX, _core
from . import cpu_paths

MAX_ROWS = 64  # the C++ decode loop's steps; oneDNN's linear ran ~1.2x this kernel at 2,048 rows (a prefill's)


def takes(weight: torch.Tensor) -> bool:
    """Whether the kernel computes a linear of this [n, k] weight on this machine."""
    return (HAVE_AMX and cpu_paths.amx_allowed() and weight.is_cpu and weight.dtype == torch.bfloat16
            and weight.dim() == 2 and weight.shape[0] % 32 == 0 and weight.shape[1] % 32 == 0)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [n, k] in the kernel's layout (a copy, the same size, still shaped [n, k])."""
    weight = weight.contiguous()
    packed = torch.empty_like(weight)
    _core.pack_linear_weight(weight.data_ptr(), weight.shape[0], weight.shape[1], packed.data_ptr())
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., k] bf16, `packed` = pack(weight)."""
    n, k = packed.shape
    if x.dtype != torch.bfloat16 or x.shape[-1] != k or (bias is not None and bias.dtype != torch.bfloat16):
        raise ValueError(f"amx linear: x {tuple(x.shape)} {x.dtype} (bias {None if bias is None else bias.dtype}) "
                         f"does not fit a bf16 weight of {n} x {k}")
    rows = x.reshape(-1, k).contiguous()
    bias = None if bias is None else bias.contiguous()  # held: the kernel reads it by address
    out = x.new_empty(*x.shape[:-1], n)
    _core.amx_linear(rows.data_ptr(), rows.shape[0], k, packed.data_ptr(), n, 0 if bias is None else bias.data_ptr(),
                     out.data_ptr())
    return out
