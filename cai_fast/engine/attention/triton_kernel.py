"""Triton paged attention (after SGLang's Triton backend): ragged queries against K/V read from the
pool through block tables at any block size, decode and prefill over a cached prefix in one
kernel, split over the keys and merged through log-sum-exps.

    paged_attention(q [T, heads, d], k_pool, v_pool, tables [R, W], q_start, q_len, kv_len, k_start [R],
                    ...) -> (out [T, heads, d], lse [T, heads] fp32)

Request r's rows q[q_start : q_start + q_len] are positions kv_len - q_len .. kv_len - 1 and see
keys k_start <= k < kv_len, causally and inside `window` (causal=False: all of them, a cascade's
shared prefix). The kernel runs on CPU under TRITON_INTERPRET=1; importing this imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kv import host_to_device, shared_prefix_tokens
from .base import PagedAttention


@triton.jit
def _paged_attention_kernel(
    Q, K, V, Out, Lse, Tables, QStart, QLen, KvLen, KStart,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
    stride_table, scale, window, block_size, num_splits,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, ROWS: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_P2: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_Q query tokens × the GROUP query heads of one kv head, of request
    program_id(0), over split program_id(2) % num_splits of its keys. Rows are (token, head in
    group) pairs, ROWS >= BLOCK_Q * GROUP_P2 (>= 16 so that tl.dot applies); padded rows, heads
    and dims are masked. Writes the split's partial out [ROWS, HEAD_DIM] and lse [ROWS]."""
    r = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_len = tl.load(QLen + r)
    if tile * BLOCK_Q >= q_len:
        return
    q_start = tl.load(QStart + r).to(tl.int64)
    kv_len = tl.load(KvLen + r)
    k_start = tl.load(KStart + r)

    rows = tl.arange(0, ROWS)
    tok = tile * BLOCK_Q + rows // GROUP_P2
    head = kv_head * GROUP + rows % GROUP_P2
    row_ok = (rows < BLOCK_Q * GROUP_P2) & (tok < q_len) & (rows % GROUP_P2 < GROUP)
    dims = tl.arange(0, HEAD_P2)
    dim_ok = dims < HEAD_DIM
    q_rows = (q_start + tok) * stride_qt + head * stride_qh
    q = tl.load(Q + q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    pos = kv_len - q_len + tok

    k_end = kv_len
    if CAUSAL:
        k_end = tl.minimum(kv_len, kv_len - q_len + tile * BLOCK_Q + BLOCK_Q)
    chunks = tl.cdiv(tl.maximum(k_end - k_start, 0), BLOCK_N)
    per_split = tl.cdiv(chunks, num_splits) * BLOCK_N
    lo = k_start + split * per_split
    hi = tl.minimum(lo + per_split, k_end)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_P2], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < hi
        block = tl.load(Tables + r * stride_table + k_pos // block_size, mask=k_ok, other=0).to(tl.int64)
        slots = block * block_size + k_pos % block_size
        kv_off = slots[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        seen = row_ok[:, None] & k_ok[None, :]
        if CAUSAL:
            seen &= k_pos[None, :] <= pos[:, None]
        if HAS_WINDOW:
            seen &= k_pos[None, :] > pos[:, None] - window
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new

    some = l_i > 0
    out = acc / tl.where(some, l_i, 1.0)[:, None]
    lse = tl.where(some, m_i + tl.log(tl.where(some, l_i, 1.0)), float("-inf"))
    o_rows = split * stride_os + (q_start + tok) * stride_ot + head * stride_oh
    tl.store(Out + o_rows[:, None] + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(Lse + split * stride_ls + (q_start + tok) * stride_lt + head, lse, mask=row_ok)


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of S key sets from their parts: out [S, T, h, d], lse [S, T, h]
    -> ([T, h, d] fp32, [T, h]). A part that saw no key (lse -inf) weighs 0."""
    total = torch.logsumexp(lse, 0)
    weights = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total)[None]).nan_to_num_(0.0)
    return (out.float() * weights[..., None]).sum(0), total


def paged_attention(q, k_pool, v_pool, tables, q_start, q_len, kv_len, k_start, *, scale: float,
                    max_q_len: int, causal: bool = True, window: int | None = None, num_splits: int = 1,
                    block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. max_q_len (a host int: no device read) sizes the grid;
    num_splits > 1 splits each request's keys over that many programs (long contexts, few
    requests) and merges them."""
    tokens, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    group_p2 = triton.next_power_of_2(group)
    block_q = 1 if max_q_len == 1 else max(1, 64 // group_p2)  # prefill: 64 rows a program
    rows = max(16, block_q * group_p2)
    out = q.new_empty((num_splits, tokens, heads, head_dim), dtype=q.dtype if num_splits == 1 else torch.float32)
    lse = torch.empty((num_splits, tokens, heads), dtype=torch.float32, device=q.device)
    grid = (len(q_len), triton.cdiv(max_q_len, block_q), kv_heads * num_splits)
    _paged_attention_kernel[grid](
        q, k_pool, v_pool, out, lse, tables, q_start, q_len, kv_len, k_start,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), tables.stride(0), scale, window or 0, block_size, num_splits,
        GROUP=group, GROUP_P2=group_p2, ROWS=rows, BLOCK_Q=block_q, HEAD_DIM=head_dim,
        HEAD_P2=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=32 if q.is_cuda else 16, CAUSAL=causal,
        HAS_WINDOW=window is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if num_splits == 1:
        return out[0], lse[0]
    merged, total = merge_splits(out, lse)
    return merged.to(q.dtype), total


class TritonPagedAttention(PagedAttention):
    """The Triton path of cai_fast.engine.attention (CUDA; CPU under TRITON_INTERPRET=1): one
    launch a layer reads K/V through the block tables at the pool's block size. A decode batch
    whose tables share leading blocks (a few-shot block) runs as a cascade: the shared keys in
    one launch for every query (read once, not B times), each request's own keys in another, the
    two merged through their log-sum-exps. The plan is computed on the host from host lists and
    reaches the device in one copy, so a step reads nothing back from the device."""

    name = "triton"

    def __init__(self, pool, windows: list[int | None], num_heads: int, scale: float, num_splits: int | None = None):
        self.pool, self.windows, self.scale, self.num_splits = pool, windows, scale, num_splits
        self.kv_heads = pool.shape.kv_heads

    def plan(self, batch) -> dict:
        """Per window: the launches (metadata tensors on the device, host ints) every layer reuses."""
        tables = batch.host_tables or [t.tolist() for t in batch.tables]
        n, width = len(tables), max(len(t) for t in tables)
        starts = [sum(batch.q_lens[:r]) for r in range(n)]
        decode = batch.is_decode and n > 1
        full = shared_prefix_tokens(tables, batch.kv_lens, batch.block_size) if decode else 0
        cut = {w: full if w is None or w >= max(batch.kv_lens) else 0 for w in set(self.windows)}
        rows = [starts, batch.q_lens, batch.kv_lens, [0] * n, *([s] * n for s in sorted(set(cut.values())) if s)]
        flat = [v for row in rows for v in row] + [0, n, full, 0]  # + the cascade's one request
        flat += [b for t in tables for b in t + [0] * (width - len(t))]
        meta = host_to_device(torch.tensor(flat, dtype=torch.int32), self.pool.k[0].device)
        views = meta[: len(rows) * n].view(len(rows), n)
        cascade = meta[len(rows) * n : len(rows) * n + 4].view(4, 1)
        table = meta[len(rows) * n + 4 :].view(n, width)
        splits = self.num_splits or _auto_splits(n * self.kv_heads, max(batch.kv_lens), table.is_cuda and decode)
        plan = {}
        for window, shared in cut.items():
            k_start = views[3] if not shared else views[4]
            main = (table, views[0], views[1], views[2], k_start, max(batch.q_lens), splits)
            extra = (table[:1], *cascade, n, splits) if shared else None
            plan[window] = (main, extra)
        return plan

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor,
               plan) -> torch.Tensor:
        """Write k, v [T, kv_heads, head_dim] at write_slots, then attention of q [T, heads, head_dim]."""
        self.pool.write(layer, write_slots, k, v)
        window = self.windows[layer]
        main, extra = plan[window]
        k_pool, v_pool, bs = self.pool.k[layer], self.pool.v[layer], self.pool.block_size
        *meta, max_q, splits = main
        out, lse = paged_attention(q, k_pool, v_pool, *meta, scale=self.scale, max_q_len=max_q, window=window,
                                   num_splits=splits, block_size=bs)
        if extra is None:
            return out
        *meta, rows, splits = extra
        shared_out, shared_lse = paged_attention(q, k_pool, v_pool, *meta, scale=self.scale, max_q_len=rows,
                                                 causal=False, num_splits=splits, block_size=bs)
        merged, _ = merge_splits(torch.stack([out, shared_out]), torch.stack([lse, shared_lse]))
        return merged.to(q.dtype)


def _auto_splits(programs: int, max_kv: int, split: bool) -> int:
    """Key splits a request gets when `split` (a decode batch on the GPU): enough programs to fill
    an H100/H200-class GPU (~132 SMs, two programs each), each split keeping at least 256 keys;
    else 1 (prefill has a program per tile of queries already; the interpreter gains nothing)."""
    if not split:
        return 1
    return max(1, min(264 // max(programs, 1), max_kv // 256))
