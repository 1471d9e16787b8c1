"""The paged KV pool: keys and values of every cached or running token, in fixed-size blocks.

Per layer one K and one V tensor of shape [num_blocks * block_size, kv_heads, head_dim]; viewed
as [num_blocks, block_size, kv_heads, head_dim] it is flash-attn's paged layout. Position p of a
request whose block table is T lives in slot T[p // block_size] * block_size + p % block_size.
The pool holds tensors only: which blocks are free, cached or running is the scheduler's business
(cai_fast.scheduler), which hands out the block ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._native import HAVE_CUDA_KERNELS
from .._native import _cuda as _cuda_kernels


@dataclass(frozen=True)
class KVShape:
    """What one token's KV takes in a model: layers × (K, V) × kv_heads × head_dim."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize


def pool_blocks(shape: KVShape, block_size: int, pool_tokens: int | None, pool_bytes: int) -> int:
    """Number of blocks of a pool sized in tokens (when given) or else in bytes."""
    tokens = pool_tokens if pool_tokens is not None else pool_bytes // shape.bytes_per_token
    blocks = tokens // block_size
    if blocks < 1:
        size = f"pool_tokens={pool_tokens}" if pool_tokens is not None else f"pool_bytes={pool_bytes}"
        raise ValueError(f"KV pool: {size} holds no whole block of {block_size} tokens "
                         f"({shape.bytes_per_token} bytes a token); raise it")
    return blocks


class KVPool:
    """K and V storage for `num_blocks` blocks of `block_size` tokens, every layer.

    `kernels`: "auto" writes and clears through the CUDA kernels of cai_fast._cuda where the pool
    is on CUDA and they are built, else through torch (index_copy_ / index_fill_, their twin);
    "torch" forces the twin."""

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, device: torch.device | str = "cpu",
                 kernels: str = "auto"):
        if kernels not in ("auto", "torch"):
            raise ValueError(f"KVPool: kernels must be 'auto' or 'torch', got {kernels!r}")
        self.shape, self.num_blocks, self.block_size = shape, num_blocks, block_size
        slots = num_blocks * block_size
        size = (slots, shape.kv_heads, shape.head_dim)
        # uninitialised, so memory is touched only as it is used: the engine clears a request's fresh
        # blocks when it is admitted, and only written or cleared slots are ever read
        self.k = [torch.empty(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.v = [torch.empty(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.cuda = kernels == "auto" and HAVE_CUDA_KERNELS and torch.device(device).type == "cuda"
        if self.cuda:  # every layer's K and V base address, for zero_blocks
            self._bases = torch.tensor([t.data_ptr() for t in (*self.k, *self.v)], device=device)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, kv_heads, head_dim] of n tokens at `slots` [n] (int64) of `layer`."""
        if self.cuda:
            self._store_cuda(layer, slots, k, v)
            return
        self._rows(self.k[layer]).index_copy_(0, slots, k.reshape(len(slots), -1))
        self._rows(self.v[layer]).index_copy_(0, slots, v.reshape(len(slots), -1))

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [len(blocks) * block_size, kv_heads, head_dim] of whole blocks (a copy). Whole
        blocks copy 1.1-1.2x faster than the same tokens selected one by one (measured on this
        CPU at 64-512 blocks of 16 tokens, SmolLM2's KV shape), and need no token index."""
        shape = (len(blocks) * self.block_size, self.shape.kv_heads, self.shape.head_dim)
        return (self._blocks(self.k[layer]).index_select(0, blocks).view(shape),
                self._blocks(self.v[layer]).index_select(0, blocks).view(shape))

    def clear(self, blocks: torch.Tensor) -> None:
        """Zero `blocks` (int64) in every layer, so that reading a block's unwritten tail gives finite values."""
        if self.cuda:
            row = self.block_size * self.shape.kv_heads * self.shape.head_dim * self.shape.dtype.itemsize
            _cuda_kernels.zero_blocks(self._bases.data_ptr(), len(self._bases), blocks.data_ptr(), len(blocks), row,
                                      torch.cuda.current_stream(blocks.device).cuda_stream)
            return
        for cache in (*self.k, *self.v):
            self._blocks(cache).index_fill_(0, blocks, 0.0)

    def _store_cuda(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = (t.reshape(len(slots), -1).contiguous().to(self.shape.dtype) for t in (k, v))
        row = k.shape[1] * k.element_size()
        _cuda_kernels.store_kv(k.data_ptr(), v.data_ptr(), row, self.k[layer].data_ptr(), self.v[layer].data_ptr(),
                               row, slots.data_ptr(), len(slots), row,
                               torch.cuda.current_stream(slots.device).cuda_stream)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.num_tokens, -1)  # one row a token

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.num_blocks, -1)  # one row a block

    def paged(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of `layer` as [num_blocks, block_size, kv_heads, head_dim] views (flash-attn's layout)."""
        view = (self.num_blocks, self.block_size, self.shape.kv_heads, self.shape.head_dim)
        return self.k[layer].view(view), self.v[layer].view(view)


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`: on CUDA through pinned memory without blocking the host (the
    copy is queued on the current stream, before the kernels that read it); elsewhere as is."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def slot_ids(block_table: torch.Tensor, start: int, end: int, block_size: int) -> torch.Tensor:
    """Slots [end - start] (int64) of positions [start, end) of a request whose block table
    (int64 tensor) is `block_table`."""
    first, last = start // block_size, -(-end // block_size)
    offsets = torch.arange(block_size, device=block_table.device)
    slots = (block_table[first:last, None] * block_size + offsets).flatten()
    return slots[start - first * block_size : end - first * block_size]


def shared_prefix_tokens(tables: list[list[int]], kv_lens: list[int], block_size: int) -> int:
    """Tokens at the start of every context held in the same blocks (whole blocks, computed:
    before every request's last position), from host block tables."""
    limit = (min(kv_lens) - 1) // block_size
    first = tables[0]
    blocks = next((i for i in range(limit) if any(t[i] != first[i] for t in tables)), limit)
    return blocks * block_size
