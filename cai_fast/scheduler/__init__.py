"""Prefix-cached batch scheduling: a block pool, a radix cache over token ids, a batch scheduler.

Integers only: token ids, block ids, lengths. Two backends with the same API and semantics:
`cai_fast._core` (C++, the default) and its pure-Python twin (`radix_py`, `scheduler_py`, the
readable reference and the fallback). Pick one with the `backend=` argument of `make_pool` /
`make_cache`; a scheduler takes the backend of its cache. The contracts of BlockPool, RadixCache and
BatchScheduler are in the docstrings of `make_pool`, `make_cache` and `make_scheduler`. Token ids must
fit in int32 and block ids are int32; the C++ checks the types of what it is given, the Python twin
does not. Neither is thread-safe.
"""

from __future__ import annotations

import warnings
from typing import Union

from cai_fast.scheduler import radix_py, scheduler_py
from cai_fast.scheduler.scheduler_py import Policy

from cai_fast._native import HAVE_CORE, _core  # None where not built: the Python twin serves

BACKENDS = ("cpp", "python")

__all__ = ["BACKENDS", "HAVE_CORE", "Policy", "backend_of", "make_cache", "make_pool", "make_scheduler"]


def _module(backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown scheduler backend {backend!r}; use 'cpp' or 'python'")
    if backend == "cpp" and not HAVE_CORE:
        warnings.warn("cai_fast._core is not built; using the pure-Python scheduler (slower)", stacklevel=3)
        return radix_py
    return _core if backend == "cpp" else radix_py


def make_pool(num_blocks: int, block_size: int, backend: str = "cpp"):
    """A BlockPool of `num_blocks` blocks of `block_size` tokens.

    BlockPool(num_blocks, block_size)
        KV block ids [0, num_blocks). `alloc(n) -> ids` (RuntimeError when fewer than n are free),
        `free(ids)` (ValueError on double free, out of range, a block the cache owns, a repeated id;
        nothing is freed then), `num_free`, `num_blocks`, `block_size`. Free ids are a stack: alloc
        pops (0 first on a new pool), free pushes.
    """
    return _module(backend).BlockPool(num_blocks, block_size)


def make_cache(num_blocks: int, block_size: int, backend: str = "cpp"):
    """A RadixCache over a new pool (reach it as `cache.pool`).

    RadixCache(pool)
        A radix tree whose nodes own blocks of `pool`. Tokens are cached in whole blocks only (a
        trailing partial block is never cached); children are keyed by their first block's tokens.
        - `match_prefix(tokens) -> MatchResult(length, blocks, node)`: the longest cached prefix in
          whole blocks, its block ids and a node handle (int; root = 0). A match ending inside a node
          splits it at the block boundary; a handle keeps naming the lower part (its locks stay
          valid). The block ids stay valid only while `node` is locked: lock it right away, before
          anything can evict. Matching counts as a use for LRU.
        - `insert(tokens, blocks) -> already_cached`: caches the whole blocks of `tokens`, with one
          block id per whole block. Returns how many leading tokens were already cached; the tree
          keeps its own blocks for those and takes `blocks[already_cached // block_size:]`, so the
          caller must free its duplicates among `blocks[:already_cached // block_size]` (those that
          are not the tree's own ids). ValueError if a block to take is not a Private block.
        - `evict(num_tokens) -> freed block ids`: frees unlocked leaves in LRU order (ties: older node
          id; a parent left without children becomes a leaf) until at least num_tokens are freed or
          nothing is evictable. Whole leaves go, so it may free more than asked.
        - `lock(node)` / `unlock(node)`: reference counts on every node from `node` up to the root.
          Unlocking an unlocked node, or naming an evicted node, raises ValueError.
        - `evictable_size`, `protected_size`, `total_size` (tokens), `check_integrity()` (RuntimeError
          naming the first broken invariant). Access times are a counter, never wall time.
    """
    module = _module(backend)
    return module.RadixCache(module.BlockPool(num_blocks, block_size))


def backend_of(obj) -> str:
    """'cpp' or 'python': the backend a pool, cache or scheduler belongs to."""
    return "cpp" if HAVE_CORE and type(obj).__module__ == _core.__name__ else "python"


def make_scheduler(cache, token_budget: int, policy: Union[Policy, str] = Policy.LPM,
                   dedup_min_tokens: int = 32, lpm_max_queue: int = 128):
    """A BatchScheduler over `cache`, of the cache's backend (see the module docstring).

    BatchScheduler(cache, policy, token_budget, dedup_min_tokens=32, lpm_max_queue=128)
        - `add(request_id, tokens, max_new_tokens=0, logits_from=None)`: generation (max_new_tokens
          > 0) or scoring (0). The cache serves at most `tokens[:logits_from]` (default: all but the
          last token) so that the logits the caller needs are computed.
        - `schedule(max_requests=None) -> ScheduleOutput(scheduled, failed)`: takes waiting requests
          in policy order (Policy.LPM, which falls back to FCFS past lpm_max_queue waiting;
          DFS_WEIGHT; FCFS — LPM and DFS_WEIGHT match every waiting request, a use for LRU) while
          the sum of `tokens_to_compute` fits `token_budget`; stops at the first request that does
          not fit. A request bigger than the budget is admitted alone, never chunked.
          Each `ScheduledRequest(request_id, cached_len, block_table, tokens_to_compute)` has its
          cached prefix locked and its block table covering prompt + max_new_tokens (cached blocks,
          then fresh ones). A request sharing >= dedup_min_tokens uncached tokens with one already
          admitted to this batch is held back (0 turns this off); it hits the cache once the other
          is cached. When blocks run out the scheduler evicts, then stops admitting; a request that
          cannot fit even in the whole pool is dropped and listed in `failed` with the reason.
        - `cache_computed(request_id, tokens) -> block_table`: caches the whole blocks computed so
          far (e.g. right after prefill) so later requests hit them; the block table may change
          (duplicates are swapped for the cache's blocks and freed).
        - `finish(request_id, tokens)`: caches the whole blocks of `tokens` — pass only tokens whose
          KV was computed (prompt + generated tokens that were fed to the model) — frees the rest of
          the request's blocks and unlocks its prefix. `abort(request_id)` releases without caching.
        - `num_waiting`, `num_running`, `cache`. Unknown request ids raise ValueError.
    """
    policy = policy.value if isinstance(policy, Policy) else policy
    cls = _core.BatchScheduler if backend_of(cache) == "cpp" else scheduler_py.BatchScheduler
    return cls(cache, policy, token_budget, dedup_min_tokens, lpm_max_queue)
