"""The flash-attn backend: `flash_attn_with_kvcache` over the block tables (causal, bottom-right
aligned), with attention="flash" only (CUDA, flash-attn installed, fp16 or bf16, block_size % 256
== 0). `auto` never takes it: no test holds it to the torch reference yet.
"""

from __future__ import annotations

import importlib.util

import torch

from ..kv import KVPool
from .base import BatchLayout, PagedAttention

HAVE_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
FLASH_BLOCK_MULTIPLE = 256  # flash-attn's paged KV needs blocks of a multiple of 256 tokens


class FlashPagedAttention(PagedAttention):
    """The flash-attn path (CUDA, flash-attn installed, block_size % 256 == 0). Untested here."""

    name = "flash"

    def __init__(self, pool: KVPool, windows: list[int | None], num_heads: int, scale: float):
        from flash_attn import flash_attn_with_kvcache

        if pool.block_size % FLASH_BLOCK_MULTIPLE:
            raise ValueError(f"flash-attn paged attention needs block_size % {FLASH_BLOCK_MULTIPLE} == 0, "
                             f"got {pool.block_size}; set EngineConfig.block_size or attention='torch'")
        self.kernel, self.pool, self.windows, self.scale = flash_attn_with_kvcache, pool, windows, scale

    def plan(self, batch: BatchLayout):
        """Queries left-padded to [B, max_q] (causal alignment is bottom-right), int32 tables."""
        width = max(batch.q_lens)
        rows = torch.cat([torch.full((n,), r) for r, n in enumerate(batch.q_lens)])
        cols = torch.cat([torch.arange(width - n, width) for n in batch.q_lens])
        tables = torch.nn.utils.rnn.pad_sequence(batch.tables, batch_first=True).int()
        device = tables.device
        lens = torch.tensor(batch.kv_lens, dtype=torch.int32, device=device)
        return rows.to(device), cols.to(device), width, tables, lens

    def attend(self, layer, q, k, v, write_slots, plan) -> torch.Tensor:
        self.pool.write(layer, write_slots, k, v)
        rows, cols, width, tables, lens = plan
        padded = q.new_zeros(len(lens), width, *q.shape[1:])
        padded[rows, cols] = q
        window = self.windows[layer]
        k_cache, v_cache = self.pool.paged(layer)
        out = self.kernel(padded, k_cache, v_cache, cache_seqlens=lens, block_table=tables,
                          softmax_scale=self.scale, causal=True,
                          window_size=(-1, -1) if window is None else (window - 1, 0))
        return out[rows, cols]
