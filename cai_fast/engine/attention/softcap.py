"""Attention with soft-capped scores (Gemma 2's `attn_logit_softcapping`): softmax(cap * tanh(s / cap))
of the scaled scores s, as transformers' eager attention computes it. No fused kernel here takes a
cap, so every batch goes the reference's prefill way: one request at a time over its gathered
context, written out in torch (scores, cap, mask, fp32 softmax, values).
"""

from __future__ import annotations

import torch

from ..kv import KVPool
from .base import BatchLayout
from .reference import TorchPagedAttention, _PrefillPlan


class SoftcapPagedAttention(TorchPagedAttention):
    """The torch backend with each layer's score cap (None: that layer is not capped)."""

    name = "torch (soft-capped scores)"

    def __init__(self, pool: KVPool, windows: list[int | None], num_heads: int, scale: float,
                 softcaps: list[float | None]):
        super().__init__(pool, windows, num_heads, scale)
        self.softcaps = softcaps

    def plan(self, batch: BatchLayout) -> _PrefillPlan:
        """The prefill plan for every batch, decode included (one new token a request)."""
        return self._prefill_plan(batch)

    @staticmethod
    def _prefill_mask(q_len: int, kv_len: int, window: int | None, device, dtype: torch.dtype):
        return TorchPagedAttention._prefill_mask(q_len, kv_len, window, "cpu", dtype)  # a tensor (or None) anywhere

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor,
               plan: _PrefillPlan) -> torch.Tensor:
        self.pool.write(layer, write_slots, k, v)
        cap, out = self.softcaps[layer], torch.empty_like(q)
        for (start, end, length), blocks, mask in zip(plan.spans, plan.blocks, plan.masks[self.windows[layer]]):
            keys, values = (t[:length].repeat_interleave(self.group, 1).transpose(0, 1)
                            for t in self.pool.gather(layer, blocks))
            scores = torch.matmul(q[start:end].transpose(0, 1), keys.transpose(1, 2)) * self.scale
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
            out[start:end] = torch.matmul(weights, values).transpose(0, 1)
        return out
