"""Seeds and seeded choices that depend only on their inputs, never on the order of a run.

Every stage derives the seed of a unit of work (a batch, a pair, a training step) from the run
seed and that unit's stable key, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def stable_seed(*parts) -> int:
    """A 32-bit seed from any printable parts (the same parts give the same seed on any machine)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seeded_sample(items: Sequence, n: int, seed: int, name: str, key=lambda x: x.id) -> list:
    """n items chosen by a seeded hash of their key (all when n >= len), kept in their order."""
    if n >= len(items):
        return list(items)
    rank = sorted(range(len(items)), key=lambda i: hashlib.sha256(f"{seed}:{name}:{key(items[i])}".encode()).digest())
    return [items[i] for i in sorted(rank[:n])]
