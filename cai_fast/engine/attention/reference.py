"""The torch reference backend, built for the CPU and run anywhere: the twin of every other.

- A batch where some request brings several tokens (prefill, scoring): one SDPA call per request
  over its gathered context, masked causally (and by the window). Not batch-invariant: torch's
  CPU SDPA blocks, and so rounds, by the call's shapes and the CPU it runs on.
- A decode batch (B >= 2): cascade attention. The keys every request shares (leading block-table
  entries common to all, e.g. a few-shot block) are gathered once and attended by all B queries in
  one product; the rest of each context is a padded, masked batch (`_RestKV`, kept between steps
  while its rows stay the same requests); the two parts merge through their log-sum-exps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..kv import KVPool, shared_prefix_tokens
from .base import BatchLayout, PagedAttention, visible

HAVE_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")  # returns the lse


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


class TorchPagedAttention(PagedAttention):
    """The torch path (see the module docstring)."""

    name = "torch"

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
        """SDPA's mask for one request: none for a single query that sees everything, the
        lower-right causal bias off the CPU without a window cutting in, else an additive mask (0
        visible, -inf not) in the model's dtype, made once a forward and read by every layer (on a
        CPU, SDPA would materialise the causal bias again in every call)."""
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
