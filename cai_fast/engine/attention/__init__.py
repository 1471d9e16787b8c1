"""Attention of a batch's new tokens over the paged KV pool, one backend a file.

`base`: the contract every backend computes and the `PagedAttention` protocol the runner uses
(plan a batch once, attend layer by layer, what the call fuses). Backends: `reference` (torch,
anywhere; the twin the tests hold every other to), `cpu_kernel` (cai_fast._core; the CPU default,
batch-invariant), `triton_kernel` (CUDA's default; imports triton), `flash` (flash-attn, by name
only), `scored` (the reference with capped scores or attention sinks, for models that have them).
`make_attention` picks one, once, when the runner is built.
"""

from __future__ import annotations

import importlib.util

import torch

from ..kv import KVPool
from .base import ROTARY, BatchLayout, PagedAttention, visible
from .cpu_kernel import CPU_KERNEL_DTYPES, HAVE_CPU_KERNEL, CpuPagedAttention, paged_decode
from .flash import FLASH_BLOCK_MULTIPLE, HAVE_FLASH_ATTN, FlashPagedAttention
from .reference import (HAVE_CPU_FLASH, REST_HEADROOM, REST_KEPT_BYTES, TorchPagedAttention, attend_with_lse,
                        attention_with_lse, heads_first, merge_parts)
from .scored import ScoredPagedAttention, score_changes

HAVE_TRITON = importlib.util.find_spec("triton") is not None

ATTENTION_KINDS = ("auto", "torch", "cpu", "flash", "triton")


def make_attention(kind: str, pool: KVPool, windows: list[int | None], num_heads: int, scale: float,
                   softcaps: list[float | None] | None = None,
                   sinks: list[torch.Tensor | None] | None = None) -> PagedAttention:
    """`kind`: "torch", "cpu", "flash", "triton" or "auto" (triton on CUDA, else the CPU kernel
    where it can run, else torch; never flash, which no test holds yet). `softcaps`: each layer's
    score cap, `sinks`: each layer's sink logits [heads], where the model has them: then only "auto"
    and "torch" run it (`scored`)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention {kind!r}; use {', '.join(ATTENTION_KINDS)}")
    softcaps, sinks = softcaps or [None] * len(windows), sinks or [None] * len(windows)
    scored = score_changes(softcaps, sinks)
    if scored and kind not in ("auto", "torch"):
        raise ValueError(f"attention={kind!r} does not take {' or '.join(scored)}, which this model has; "
                         "use 'auto' or 'torch'")
    if scored:
        return ScoredPagedAttention(pool, windows, num_heads, scale, softcaps, sinks)
    usable = HAVE_FLASH_ATTN and pool.k[0].is_cuda and pool.shape.dtype in (torch.float16, torch.bfloat16)
    if kind == "flash" and not usable:
        raise ValueError("attention='flash' needs flash-attn installed and an fp16/bf16 model on CUDA; use 'auto'")
    if kind == "flash":
        return FlashPagedAttention(pool, windows, num_heads, scale)
    if kind == "triton" and not HAVE_TRITON:
        raise ValueError("attention='triton' needs triton installed (pip install triton); use 'auto'")
    if kind == "triton" or (kind == "auto" and HAVE_TRITON and pool.k[0].is_cuda):
        from .triton_kernel import TritonPagedAttention  # imports triton, an optional dependency

        return TritonPagedAttention(pool, windows, num_heads, scale)
    cpu = HAVE_CPU_KERNEL and pool.k[0].is_cpu and pool.shape.dtype in CPU_KERNEL_DTYPES
    if kind == "cpu" or (kind == "auto" and cpu):
        return CpuPagedAttention(pool, windows, num_heads, scale)
    return TorchPagedAttention(pool, windows, num_heads, scale)
