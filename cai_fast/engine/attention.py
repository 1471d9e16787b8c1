"""Attention of a batch's new tokens over the paged KV pool: torch anywhere, a C++ decode kernel on a
CPU, Triton or flash-attn on CUDA.

A batch holds B requests; request r brings q_lens[r] new tokens at positions kv_lens[r] - q_lens[r]
.. kv_lens[r] - 1 and sees the keys at positions < kv_lens[r] through its block table: causally,
and inside the layer's sliding window when the model has one (a key at position k is visible from
position p when p - window < k <= p). `attend` first writes the new tokens' K and V to the pool.

Torch path (`TorchPagedAttention`), built for the CPU:
- a batch where some request brings several tokens (prefill, scoring): one SDPA call per request
  over its gathered context, with a mask that lets each new token see the keys before it (and
  inside the window): on a CPU an additive mask in the model's dtype made once a forward and
  read by every layer (SDPA's lower-right causal bias is materialised again by every call on a
  CPU, tril and where: ~8% of the judge's time), elsewhere the lower-right causal bias, which
  SDPA's fused CUDA kernels take. It is the reference, not batch-invariant: torch's CPU SDPA
  blocks (and so rounds) by the call's shapes and the CPU it runs on;
- a decode batch (one token each, B >= 2): one batched pass. The keys every request shares (the
  leading block-table entries common to all, e.g. a few-shot block) are gathered once and kept
  while the batch's requests are admitted by the same scheduling round, and are attended as one
  matrix product for all B queries; the rest of each context is gathered, in whole blocks (see
  KVPool.gather), into a padded batch whose past-the-end positions are masked (the engine zeroes
  a request's fresh blocks, so they hold finite values). That padded batch is kept between steps
  while its rows stay the same requests, each one token longer (`_RestKV`): a step then writes its
  new K/V into it instead of gathering every block again (the gathers were 12% of a decode step
  at batch 32); it holds a few blocks of headroom a row and is gathered anew when a row outgrows
  it, the rows change or the blocks may have been handed out again, and is not kept where it
  would exceed REST_KEPT_BYTES. The two parts merge through their
  log-sum-exps (cascade attention). The shared part is read once a step instead of B times,
  which is what bounds decode on a CPU (3.0x the tokens/s at batch 32 after the 978-token
  few-shot block, benches/README.md). Both parts go through torch's fused CPU flash kernel,
  which returns the log-sum-exp and accumulates in fp32 (`attention_with_lse`; 5-7x the
  per-head bmm reference `attend_with_lse` at batch 32 × 600 keys, fp32 and bf16); the
  reference is taken off the CPU.
CPU kernel path (`CpuPagedAttention`, the default on a CPU in fp32 or bf16 where cai_fast._core
is built): every batch through `_core.paged_decode_attention` (csrc/paged_attention.cpp); in a
prefill or scoring batch the token at position p is a row whose context ends at p, and the
kernel's chunks of keys end at fixed positions, so a token's result is bit-identical whatever
else is in its batch, however much of its request was cached, in prefill or decode (batch
invariance; as fast as SDPA or faster, benches/README.md). The kernel reads every request's keys in
place through its block table (no gathered copy, no packing), scores the keys every request
shares once for all of their queries, keeps an online softmax in fp32, and runs on torch's own
OpenMP threads. In the runner's eager decode step it also applies the rotary embedding to q and k
(bit for bit as transformers does) and writes k and v to the pool, one call a layer instead of
~20 small torch ops. The torch path is its twin (the tests hold them together); on the SL-CAI
decode it replaces two flash calls a layer that packed K/V for AMX every step (24% of the step,
benches/README.md).
Flash path (`FlashPagedAttention`): `flash_attn_with_kvcache` over the block tables (causal,
bottom-right aligned), with attention="flash" only (CUDA, flash-attn installed, fp16 or bf16,
block_size % 256 == 0): `auto` never takes it, since no test holds it to the torch path.
Triton path (`cai_fast.engine.paged_kernel.TritonPagedAttention`): a Triton kernel reading K/V
through the block tables at any block size, decode and prefill over a cached prefix in one
kernel, the decode cascade over shared leading blocks as above; `auto` takes it on CUDA
(tested against the torch path under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from .._native import HAVE_CPU_KERNEL, _core
from . import cpu_paths
from .kv import KVPool, shared_prefix_tokens

HAVE_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")  # returns the lse
FLASH_BLOCK_MULTIPLE = 256  # flash-attn's paged KV needs blocks of a multiple of 256 tokens
CPU_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtype codes


@dataclass
class BatchLayout:
    """Where a batch's requests stand: new tokens, context lengths, block tables (int64)."""

    q_lens: list[int]
    kv_lens: list[int]
    tables: list[torch.Tensor]
    block_size: int
    host_tables: list[list[int]] = field(default_factory=list)  # the same tables on the host, when known

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.q_lens)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask [len(q_pos), len(k_pos)]: which keys each query position sees."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning (out [B, h, m, d], lse [B, h, m, 1]).

    q [B, h, m, d] (m queries per kv head), k, v [B, n, h, d] token-major as the pool gathers them,
    mask [B, 1, n] or None (True = visible; every query must see at least one key). One bmm per
    kv head reads k and v in place: no transposed copy of the keys is made.
    """
    outs, lses = [], []
    for head in range(q.shape[1]):
        scores = torch.bmm(q[:, head], k[:, :, head].transpose(1, 2)).mul_(scale)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        top = scores.amax(-1, keepdim=True)
        weights = scores.sub_(top).exp_()
        total = weights.sum(-1, keepdim=True)
        outs.append(torch.bmm(weights, v[:, :, head]).div_(total))
        lses.append(top + total.log())
    return torch.stack(outs, 1), torch.stack(lses, 1)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_with_lse` (same shapes and mask), through torch's fused flash kernel on CPU tensors.

    bias: the mask as an additive [B, 1, n] (0 visible, -inf not) in q's dtype, or None; the kernel
    reads it (the boolean mask is for the reference). lse comes back in fp32, out in q's dtype.
    """
    if not (q.is_cpu and HAVE_CPU_FLASH):
        return attend_with_lse(q, k, v, mask, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=None if bias is None else bias[:, :, None], scale=scale)
    return out, lse[..., None]


def heads_first(t: torch.Tensor) -> torch.Tensor:
    """[n, heads, d] -> [1, heads, n, d] (a view), the layout SDPA and the flash kernel take."""
    return t.transpose(0, 1)[None]


def merge_parts(o1, lse1, o2, lse2) -> torch.Tensor:
    """Attention over the union of two key sets, from each part's output and log-sum-exp (fp32),
    in the outputs' dtype: o1 weighs exp(lse1) / (exp(lse1) + exp(lse2)) = sigmoid(lse1 - lse2),
    so the mix is one lerp (a part whose lse is -inf, no key, weighs 0)."""
    return torch.lerp(o2, o1, torch.sigmoid(lse1 - lse2).to(o1.dtype))


@dataclass
class _PrefillPlan:
    spans: list[tuple[int, int, int]]  # each request's rows in the batch and its context length
    blocks: list[torch.Tensor]  # the blocks holding each request's context
    masks: dict  # window -> per-request mask (None, a causal bias or an additive mask)


@dataclass
class _DecodePlan:
    shared: dict  # window -> (shared tokens P, their blocks); P = 0 where a window cuts in
    rest: dict  # window -> (blocks [B * W], mask [B, 1, W * block_size], the mask as a bias, W blocks a request)
    kept: _RestKV | None = None  # the kept rest of full-attention layers (None: gathered each step)
    new_at: tuple | None = None  # (rows [B], positions [B]): where each row's new token lands in kept.k / kept.v


@dataclass
class _RestKV:
    rows: list = field(default_factory=list)  # per row: (its blocks after the shared ones, context length)
    n_shared: int = -1
    width: int = 0  # blocks a row holds
    k: dict = field(default_factory=dict)  # layer -> [B, width * block_size, kv_heads, head_dim]
    v: dict = field(default_factory=dict)


REST_KEPT_BYTES = 512 << 20  # at most this much kept decode K/V, all layers together (else gathered each step)
REST_HEADROOM = 4  # blocks a kept row can grow into before the rows are gathered anew


@dataclass
class _SharedKV:
    key: tuple = ()
    k: dict = field(default_factory=dict)  # layer -> [P, kv_heads, head_dim]
    v: dict = field(default_factory=dict)


class TorchPagedAttention:
    """The torch path (see the module docstring)."""

    def __init__(self, pool: KVPool, windows: list[int | None], num_heads: int, scale: float):
        self.pool, self.windows, self.scale = pool, windows, scale
        self.kv_heads, self.head_dim = pool.shape.kv_heads, pool.shape.head_dim
        self.group = num_heads // self.kv_heads
        self._shared, self._kept = _SharedKV(), _RestKV()

    def forget_shared(self) -> None:
        """Drop the kept copies of shared and per-row keys: call whenever blocks may have been reallocated."""
        self._shared, self._kept = _SharedKV(), _RestKV()

    def plan(self, batch: BatchLayout):
        """What every layer reuses: slots and masks of the batch."""
        device = self.pool.k[0].device
        batch = dataclasses.replace(batch, tables=[t.to(device) for t in batch.tables])
        if batch.is_decode and len(batch.q_lens) > 1:
            return self._decode_plan(batch)
        return self._prefill_plan(batch)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor,
               plan) -> torch.Tensor:
        """Write k, v [T, kv_heads, head_dim] at write_slots, then attention of q [T, heads, head_dim]."""
        self.pool.write(layer, write_slots, k, v)
        if isinstance(plan, _DecodePlan):
            return self._decode(layer, q, k, v, plan)
        return self._prefill(layer, q, plan)

    # ---------------------------------------------------------------- prefill: one SDPA a request

    def _prefill_plan(self, batch: BatchLayout) -> _PrefillPlan:
        spans, blocks, start = [], [], 0
        for n, length, table in zip(batch.q_lens, batch.kv_lens, batch.tables):
            spans.append((start, start + n, length))
            blocks.append(table[: -(-length // batch.block_size)])
            start += n
        dtype = self.pool.shape.dtype
        masks = {w: [self._prefill_mask(n, length, w, table.device, dtype) for n, length, table
                     in zip(batch.q_lens, batch.kv_lens, batch.tables)] for w in set(self.windows)}
        return _PrefillPlan(spans, blocks, masks)

    @staticmethod
    def _prefill_mask(q_len: int, kv_len: int, window: int | None, device, dtype: torch.dtype):
        """SDPA's mask for one request (see the module docstring): none for a single query that
        sees everything, the lower-right causal bias off the CPU without a window cutting in, else
        an additive mask (0 visible, -inf not)."""
        whole = window is None or window >= kv_len
        if whole and q_len == 1:
            return None
        if whole and torch.device(device).type != "cpu":
            return causal_lower_right(q_len, kv_len)
        k_pos = torch.arange(kv_len, device=device)
        allowed = visible(k_pos[kv_len - q_len :], k_pos, window)
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

    def _prefill(self, layer: int, q: torch.Tensor, plan: _PrefillPlan) -> torch.Tensor:
        out = torch.empty_like(q)
        for (start, end, length), blocks, mask in zip(plan.spans, plan.blocks, plan.masks[self.windows[layer]]):
            kv = (t[:length] for t in self.pool.gather(layer, blocks))
            attended = F.scaled_dot_product_attention(heads_first(q[start:end]), *map(heads_first, kv),
                                                      attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[start:end] = attended[0].transpose(0, 1)
        return out

    # ---------------------------------------------------------------- decode: cascade over shared keys

    def _decode_plan(self, batch: BatchLayout) -> _DecodePlan:
        full = self._shared_tokens(batch)
        kept, new_at = self._keep_rest(batch, full) if None in self.windows else (None, None)
        shared, rest = {}, {}
        for window in set(self.windows):
            n_shared = 0 if window is not None and window < max(batch.kv_lens) else full
            shared[window] = (n_shared, batch.tables[0][: n_shared // batch.block_size])
            width = kept.width if kept is not None and window is None else None
            rest[window] = self._rest(batch, n_shared, window, self.pool.shape.dtype, width)
        return _DecodePlan(shared, rest, kept, new_at)

    def _keep_rest(self, batch: BatchLayout, n_shared: int) -> tuple[_RestKV | None, tuple | None]:
        """The kept rest for this step (the last step's when every row is the same request one
        token on, else a fresh one to gather) and where each row's new token goes in it; (None,
        None) where it would exceed REST_KEPT_BYTES."""
        bs, first = batch.block_size, n_shared // batch.block_size
        tables = batch.host_tables or [t.tolist() for t in batch.tables]
        rows = [(table[first : -(-length // bs)], length) for table, length in zip(tables, batch.kv_lens)]
        old = self._kept
        same = (old.n_shared == n_shared and len(old.rows) == len(rows) and
                all(n == m + 1 and b[: len(c)] == c and len(b) <= old.width for (b, n), (c, m) in zip(rows, old.rows)))
        if not same:
            width = max(len(b) for b, _ in rows) + REST_HEADROOM
            kv = self.pool.shape
            if len(rows) * width * bs * kv.bytes_per_token > REST_KEPT_BYTES:
                self._kept = _RestKV()
                return None, None
            old = self._kept = _RestKV(n_shared=n_shared, width=width)
        old.rows = rows
        device = batch.tables[0].device
        return old, (torch.arange(len(rows), device=device),
                     torch.tensor([n - 1 - n_shared for _, n in rows], device=device))

    @staticmethod
    def _shared_tokens(batch: BatchLayout) -> int:
        tables = batch.host_tables or [t.tolist() for t in batch.tables]
        return shared_prefix_tokens(tables, batch.kv_lens, batch.block_size)

    @staticmethod
    def _rest(batch: BatchLayout, n_shared: int, window: int | None, dtype: torch.dtype, width: int | None = None):
        """Each request's blocks after the shared ones, padded to W (the most any request has, or
        `width`) with its last block (every position past its context is masked out: causally,
        since it lies after the query)."""
        bs, first = batch.block_size, n_shared // batch.block_size
        counts = [-(-length // bs) - first for length in batch.kv_lens]
        width = width or max(counts)
        blocks = torch.empty(len(counts), width, dtype=torch.long, device=batch.tables[0].device)
        for r, (count, table) in enumerate(zip(counts, batch.tables)):
            blocks[r] = table[first + count - 1]
            blocks[r, :count] = table[first : first + count]
        k_pos = torch.arange(n_shared, n_shared + width * bs)
        mask = visible(torch.tensor(batch.kv_lens) - 1, k_pos, window)[:, None, :].to(blocks.device)
        bias = torch.zeros(mask.shape, dtype=dtype, device=blocks.device).masked_fill_(~mask, float("-inf"))
        return blocks.flatten(), mask, bias, width

    def _shared_kv(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(blocks.tolist())
        if self._shared.key != key:
            self._shared = _SharedKV(key)
        if layer not in self._shared.k:
            self._shared.k[layer], self._shared.v[layer] = self.pool.gather(layer, blocks)
        return self._shared.k[layer], self._shared.v[layer]

    def _decode(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                plan: _DecodePlan) -> torch.Tensor:
        window = self.windows[layer]
        batch, (h, g, d) = q.shape[0], (self.kv_heads, self.group, self.head_dim)
        qg = q.view(batch, h, g, d)
        blocks, mask, bias, width = plan.rest[window]
        kept = plan.kept if window is None else None
        if kept is not None and layer in kept.k:  # the rows as last step: add this step's token
            kept.k[layer][plan.new_at] = k_new
            kept.v[layer][plan.new_at] = v_new
            k, v = kept.k[layer], kept.v[layer]
        else:
            k, v = (t.view(batch, width * self.pool.block_size, h, d) for t in self.pool.gather(layer, blocks))
            if kept is not None:
                kept.k[layer], kept.v[layer] = k, v
        out, lse = attention_with_lse(qg, k, v, mask, bias, self.scale)
        n_shared, shared_blocks = plan.shared[window]
        if n_shared:
            ks, vs = self._shared_kv(layer, shared_blocks)
            flat = qg.transpose(0, 1).reshape(1, h, batch * g, d)  # every query against the shared keys
            o2, lse2 = attention_with_lse(flat, ks[None], vs[None], None, None, self.scale)
            unflat = lambda t: t.view(h, batch, g, -1).transpose(0, 1)  # noqa: E731
            out = merge_parts(out, lse, unflat(o2[0]), unflat(lse2[0]))
        return out.reshape(batch, h * g, d)


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
    """The CPU kernel path (see the module docstring): decode through `paged_decode`."""

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

    @staticmethod
    def rotates(plan) -> bool:
        """Whether `attend_unrotated` takes this plan's batch (a decode batch)."""
        return isinstance(plan, _KernelPlan) and plan.decode

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor,
               plan) -> torch.Tensor:
        self.pool.write(layer, write_slots, k, v)
        window = self.windows[layer]
        return paged_decode(q, self.pool.k[layer], self.pool.v[layer], plan.tables, plan.kv_lens,
                            self.pool.block_size, window, self.scale, plan.shared[window])

    def attend_unrotated(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, plan: _KernelPlan) -> torch.Tensor:
        """`attend` of a decode batch whose q and k are not yet rotated (cos, sin [B, head_dim]):
        the kernel rotates them, writes k and v at each request's last position, and attends (the
        runner's decode step, one call a layer instead of ~20 small ops)."""
        window = self.windows[layer]
        return paged_decode(q, self.pool.k[layer], self.pool.v[layer], plan.tables, plan.kv_lens,
                            self.pool.block_size, window, self.scale, plan.shared[window], new=(k, v, cos, sin))


class FlashPagedAttention:
    """The flash-attn path (CUDA, flash-attn installed, block_size % 256 == 0). Untested here."""

    def __init__(self, pool: KVPool, windows: list[int | None], num_heads: int, scale: float):
        from flash_attn import flash_attn_with_kvcache

        if pool.block_size % FLASH_BLOCK_MULTIPLE:
            raise ValueError(f"flash-attn paged attention needs block_size % {FLASH_BLOCK_MULTIPLE} == 0, "
                             f"got {pool.block_size}; set EngineConfig.block_size or attention='torch'")
        self.kernel, self.pool, self.windows, self.scale = flash_attn_with_kvcache, pool, windows, scale

    def forget_shared(self) -> None:
        """Nothing is kept between steps on this path."""

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


ATTENTION_KINDS = ("auto", "torch", "cpu", "flash", "triton")


def make_attention(kind: str, pool: KVPool, windows: list[int | None], num_heads: int, scale: float):
    """`kind`: "torch", "cpu", "flash", "triton" or "auto" (triton on CUDA, else the CPU kernel
    where it can run, else torch; never flash, which no test holds yet; see the module docstring)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention {kind!r}; use {', '.join(ATTENTION_KINDS)}")
    usable = HAVE_FLASH_ATTN and pool.k[0].is_cuda and pool.shape.dtype in (torch.float16, torch.bfloat16)
    if kind == "flash" and not usable:
        raise ValueError("attention='flash' needs flash-attn installed and an fp16/bf16 model on CUDA; use 'auto'")
    if kind == "flash":
        return FlashPagedAttention(pool, windows, num_heads, scale)
    if kind == "triton" and not HAVE_TRITON:
        raise ValueError("attention='triton' needs triton installed (pip install triton); use 'auto'")
    if kind == "triton" or (kind == "auto" and HAVE_TRITON and pool.k[0].is_cuda):
        from .paged_kernel import TritonPagedAttention

        return TritonPagedAttention(pool, windows, num_heads, scale)
    cpu = HAVE_CPU_KERNEL and pool.k[0].is_cpu and pool.shape.dtype in CPU_KERNEL_DTYPES
    if kind == "cpu" or (kind == "auto" and cpu):
        return CpuPagedAttention(pool, windows, num_heads, scale)
    return TorchPagedAttention(pool, windows, num_heads, scale)
