"""Attention whose scores no fused kernel here takes: soft-capped scores (Gemma 2's
`attn_logit_softcapping`: cap * tanh(s / cap) of the scaled scores s) and learned attention sinks
(GPT-OSS: one logit a query head that joins the softmax's denominator and attends to nothing), as
transformers' eager attention computes them. Every batch goes the reference's prefill way: one
request at a time over its gathered context, written out in torch (scores, cap, mask, sink, fp32
softmax, values).
"""

from __future__ import annotations

import torch

from ..kv import KVPool
from .base import BatchLayout
from .reference import TorchPagedAttention, _PrefillPlan


def score_changes(softcaps: list[float | None], sinks: list[torch.Tensor | None]) -> list[str]:
    """What a model with these per-layer caps and sinks does to its scores, in words (none: [])."""
    return [what for what, per_layer in (("soft-capped scores", softcaps), ("attention sinks", sinks))
            if any(x is not None for x in per_layer)]


class ScoredPagedAttention(TorchPagedAttention):
    """The torch backend with each layer's score cap and sinks (None: that layer has none). sinks:
    the [heads] tensors the model passes (its parameters, read at each call)."""

    def __init__(self, pool: KVPool, windows: list[int | None], num_heads: int, scale: float,
                 softcaps: list[float | None], sinks: list[torch.Tensor | None]):
        super().__init__(pool, windows, num_heads, scale)
        self.softcaps, self.sinks = softcaps, sinks
        self.name = f"torch ({', '.join(score_changes(softcaps, sinks))})"

    def plan(self, batch: BatchLayout) -> _PrefillPlan:
        """The prefill plan for every batch, decode included (one new token a request)."""
        return self._prefill_plan(batch)

    @staticmethod
    def _prefill_mask(q_len: int, kv_len: int, window: int | None, device, dtype: torch.dtype):
        return TorchPagedAttention._prefill_mask(q_len, kv_len, window, "cpu", dtype)  # a tensor (or None) anywhere

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor,
               plan: _PrefillPlan) -> torch.Tensor:
        self.pool.write(layer, write_slots, k, v)
        cap, sinks, out = self.softcaps[layer], self.sinks[layer], torch.empty_like(q)
        for (start, end, length), blocks, mask in zip(plan.spans, plan.blocks, plan.masks[self.windows[layer]]):
            keys, values = (t[:length].repeat_interleave(self.group, 1).transpose(0, 1)
                            for t in self.pool.gather(layer, blocks))
            scores = torch.matmul(q[start:end].transpose(0, 1), keys.transpose(1, 2)) * self.scale
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
            if mask is not None:
                scores = scores + mask
            if sinks is not None:  # [heads, n, length + 1]; the sink's column is dropped after the softmax
                scores = torch.cat([scores, sinks.to(scores)[:, None, None].expand(-1, end - start, 1)], -1)
            weights = torch.softmax(scores, -1, dtype=torch.float32)[..., :length].to(q.dtype)
            out[start:end] = torch.matmul(weights, values).transpose(0, 1)
        return out
