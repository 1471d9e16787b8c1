"""What every paged-attention backend computes, and what the runner asks of one.

A batch holds B requests; request r brings q_lens[r] new tokens at positions kv_lens[r] - q_lens[r]
.. kv_lens[r] - 1 and sees the keys at positions < kv_lens[r] through its block table: causally,
and inside the layer's sliding window when the model has one (a key at position k is visible from
position p when p - window < k <= p). `attend` first writes the new tokens' K and V to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..kv import KVPool


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


ROTARY = "rotary embedding (decode)"  # in `fuses` of a backend whose attend_unrotated rotates q and k


class PagedAttention(Protocol):
    """A backend: built with (pool, each layer's window, query heads, scale); plans a batch once
    for every layer, then attends layer by layer. Backends subclass it for the defaults."""

    name: str  # how the runner's kernel record names it
    fuses: tuple[str, ...] = ("pool write",)  # what `attend` does beside attention
    pool: KVPool
    windows: list[int | None]
    scale: float

    def plan(self, batch: BatchLayout) -> object:
        """What every layer of this batch reuses (masks, launches, tables)."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor,
               plan) -> torch.Tensor:
        """Write k, v [T, kv_heads, head_dim] at write_slots, then attention of q [T, heads, head_dim]."""
        ...

    def forget_shared(self) -> None:
        """Drop whatever is kept between steps: called whenever blocks may have been handed out again."""

    def rotates(self, plan) -> bool:
        """Whether `attend_unrotated` takes this plan's batch (q and k given before the rotary embedding)."""
        return False

    def attend_unrotated(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, plan) -> torch.Tensor:
        """`attend` of a batch `rotates` takes, its q and k rotated here (cos, sin [B, head_dim])."""
        raise RuntimeError(f"{self.name} attention does not apply the rotary embedding: call attend_unrotated only "
                           "for a plan that rotates(plan) accepts")
