"""The C++ CPU kernel backend (cai_fast._core.paged_decode_attention, csrc/paged_attention.cpp),
the default on a CPU in fp32 or bf16. Every batch goes through one kernel: in a prefill or scoring
batch the token at position p is a row whose context ends at p, and the kernel's key chunks end
at fixed positions, so a token's result is bit-identical whatever else is in its batch, however
much of its request was cached, in prefill or decode (batch invariance). It reads keys in place
through the block tables, scores the keys every request shares once for all of their queries,
keeps an online softmax in fp32, and in a decode step also applies the rotary embedding and
writes the pool (`attend_unrotated`). The torch reference is its twin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._native import HAVE_CPU_KERNEL, _core
from .. import cpu_paths
from ..kv import KVPool, shared_prefix_tokens
from .base import ROTARY, BatchLayout
from .reference import TorchPagedAttention

CPU_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 kv_lens: torch.Tensor, block_size: int, window: int | None, scale: float, shared: int = 0,
                 portable: bool | None = None, new: tuple | None = None) -> torch.Tensor:
    """Attention of q [B, heads, head_dim] (one new token a request, its K/V already in the pool)
    over a layer's pool k_cache, v_cache [slots, kv_heads, head_dim] through int64 block tables
    [B, W] (padded rows are fine) and context lengths [B], by `_core.paged_decode_attention`. CPU
    tensors of one dtype in CPU_KERNEL_DTYPES. `shared`: leading tokens held in the same blocks by
    every table (`shared_prefix_tokens`; 0 under a window), whose keys are then read once for all
    B requests. `portable`: the kernel's plain loops even where its AVX-512 ones could run (None: as
    CAI_FAST_CPU says, cai_fast.engine.cpu_paths).

    new = (k, v, cos, sin): q and k [B, heads, head_dim] are the new tokens before the rotary
    embedding (rows may be strided, heads contiguous), cos and sin [B, head_dim] its tables; the
    kernel rotates q and k as transformers' apply_rotary_pos_emb does, bit for bit, and stores k and
    v at each request's last position (the pool write) before attending."""
    out = torch.empty(q.shape, dtype=q.dtype)
    tables, kv_lens = tables.contiguous(), kv_lens.contiguous()
    fresh = {}
    if new is None:
        q = q.contiguous()
    else:
        k, v, cos, sin = new
        cos, sin = cos.contiguous(), sin.contiguous()
        for t in (q, k, v):
            if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
                raise ValueError(f"paged_decode: new tokens need contiguous heads, got strides {t.stride()}")
        if k.stride(0) != v.stride(0) or cos.shape != (q.shape[0], q.shape[2]) or sin.shape != cos.shape:
            raise ValueError("paged_decode: k and v need one row stride, cos and sin the shape [B, head_dim]")
        fresh = dict(q_new=q.data_ptr(), k_new=k.data_ptr(), v_new=v.data_ptr(), q_stride=q.stride(0),
                     kv_stride=k.stride(0), cos=cos.data_ptr(), sin=sin.data_ptr())
    _core.paged_decode_attention(0 if new else q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                 tables.data_ptr(), tables.shape[1], kv_lens.data_ptr(), q.shape[0], q.shape[1],
                                 k_cache.shape[1], k_cache.shape[2], block_size, window or 0, shared, scale,
                                 CPU_KERNEL_DTYPES[q.dtype], k_cache.shape[0], cpu_paths.portable(portable),
                                 **fresh)
    return out


@dataclass
class _KernelPlan:
    tables: torch.Tensor  # [B, W] int64, each row padded with block 0
    kv_lens: torch.Tensor  # [B] int64
    shared: dict  # window -> leading tokens every table holds in the same blocks (0 where a window cuts in)
    decode: bool = True  # one row a request; else a row a new token (a prefill or scoring batch)


class CpuPagedAttention(TorchPagedAttention):
    """The CPU kernel path (see the module docstring); the reference's state, unused, is inherited
    with its constructor."""

    name = "cpu"
    fuses = ("pool write", ROTARY)

    def __init__(self, pool: KVPool, windows: list[int | None], num_heads: int, scale: float):
        if not HAVE_CPU_KERNEL:
            raise ValueError("attention='cpu' needs cai_fast._core built (pip install .); use 'auto'")
        if not pool.k[0].is_cpu or pool.shape.dtype not in CPU_KERNEL_DTYPES:
            raise ValueError(f"attention='cpu' needs a CPU model in fp32 or bf16, got {pool.shape.dtype} on "
                             f"{pool.k[0].device}; use 'auto'")
        super().__init__(pool, windows, num_heads, scale)

    def plan(self, batch: BatchLayout):
        """A row a request (decode), or a row a new token (prefill, scoring): the token at position p
        attends as a decode row whose context ends at p, so its result depends on its own context only
        (neither on the batch, nor on how much of its request was cached, nor on prefill vs decode)."""
        host = batch.host_tables or [t.tolist() for t in batch.tables]
        width = max(len(t) for t in host)
        padded = [t + [0] * (width - len(t)) for t in host]
        if batch.is_decode:
            rows, lens = padded, batch.kv_lens
        else:
            rows = [table for table, n in zip(padded, batch.q_lens) for _ in range(n)]
            lens = [p + 1 for n, length in zip(batch.q_lens, batch.kv_lens) for p in range(length - n, length)]
        full = shared_prefix_tokens(rows, lens, batch.block_size) if len(rows) > 1 else 0
        shared = {w: 0 if w is not None and w < max(lens) else full for w in set(self.windows)}
        return _KernelPlan(torch.tensor(rows, dtype=torch.long), torch.tensor(lens, dtype=torch.long), shared,
                           batch.is_decode)

    def rotates(self, plan) -> bool:
        """A decode batch's plan."""
        return isinstance(plan, _KernelPlan) and plan.decode

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor,
               plan) -> torch.Tensor:
        self.pool.write(layer, write_slots, k, v)
        shared, window = self._shared_window(layer, plan)
        return paged_decode(q, self.pool.k[layer], self.pool.v[layer], plan.tables, plan.kv_lens,
                            self.pool.block_size, window, self.scale, shared)

    def _shared_window(self, layer: int, plan: _KernelPlan) -> tuple[int, int | None]:
        """The layer's shared tokens and the window the kernel applies: none where the window cuts
        into no row's context (the plan shares keys only then), which attends to the same keys in
        the same order."""
        window = self.windows[layer]
        shared = plan.shared[window]
        return shared, None if shared else window

    def attend_unrotated(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, plan: _KernelPlan) -> torch.Tensor:
        """`attend` of a decode batch whose q and k are not yet rotated (cos, sin [B, head_dim]):
        the kernel rotates them, writes k and v at each request's last position, and attends (the
        runner's decode step, one call a layer instead of ~20 small ops)."""
        shared, window = self._shared_window(layer, plan)
        return paged_decode(q, self.pool.k[layer], self.pool.v[layer], plan.tables, plan.kv_lens,
                            self.pool.block_size, window, self.scale, shared, new=(k, v, cos, sin))
