"""Attention of a batch's new tokens over the paged KV pool, one backend a file.

`base`: the contract every backend computes and the `PagedAttention` protocol the runner uses
(plan a batch once, attend layer by layer, what the call fuses). Backends: `reference` (torch,
anywhere; the twin the tests hold every other to), `cpu_kernel` (cai_fast._core; the CPU default,
batch-invariant), `triton_kernel` (CUDA's default; imports triton), `flash` (flash-attn, by name
only), `softcap` (the reference with capped scores, for models that cap them). `make_attention`
picks one, once, when the runner is built.
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
from .softcap import SoftcapPagedAttention

HAVE_TRITON = importlib.util.find_spec("triton") is not None

ATTENTION_KINDS = ("auto", "torch", "cpu", "flash", "triton")


def make_attention(kind: str, pool: KVPool, windows: list[int | None], num_heads: int,
                   scale: float, softcaps: list[float | None] | None = None) -> PagedAttention:
    """`kind`: "torch", "cpu", "flash", "triton" or "auto" (triton on CUDA, else the CPU kernel
    where it can run, else torch; never flash, which no test holds yet). `softcaps`: each layer's
    score cap, where the model caps scores: then only "auto" and "torch" run it (`softcap`)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention {kind!r}; use {', '.join(ATTENTION_KINDS)}")
    if softcaps and any(c is not None for c in softcaps):
        if kind not in ("auto", "torch"):
            raise ValueError(f"attention={kind!r} does not cap attention scores, which this model does; "
                             "use 'auto' or 'torch'")
        return SoftcapPagedAttention(pool, windows, num_heads, scale, softcaps)
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
