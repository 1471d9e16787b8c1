"""Pure-Python twin of `cai_fast._core.BatchScheduler`, and the scheduling `Policy` enum.

Same API, semantics, ordering and error messages as the C++ (tests drive both side by side).
See `cai_fast.scheduler` for the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional, Sequence

from cai_fast.scheduler.radix_py import MatchResult, Node, RadixCache


class Policy(str, Enum):
    """Order in which waiting requests are considered for the next batch."""

    LPM = "lpm"  # longest cached prefix first (FCFS past lpm_max_queue waiting requests)
    DFS_WEIGHT = "dfs-weight"  # SGLang's DFS over the tree, heaviest subtree first
    FCFS = "fcfs"  # arrival order


@dataclass(frozen=True)
class ScheduledRequest:
    request_id: int
    cached_len: int  # tokens served from the cache (a multiple of block_size)
    block_table: list[int]  # cached blocks, then fresh ones for the rest (+ max_new_tokens)
    tokens_to_compute: list[int]  # tokens[cached_len:]


@dataclass(frozen=True)
class FailedRequest:
    request_id: int
    reason: str


@dataclass(frozen=True)
class ScheduleOutput:
    scheduled: list[ScheduledRequest]
    failed: list[FailedRequest]


@dataclass
class _Waiting:
    id: int
    tokens: list[int]
    max_new_tokens: int
    logits_from: int  # the cache serves at most tokens[:logits_from]


@dataclass
class _Running:
    tokens: list[int]  # the longest token list known (prompt, then computed)
    block_table: list[int]
    cached_len: int  # block_table[:cached_len // block_size] belongs to the tree
    node: int  # locked tree node covering that prefix


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _match_key(req: _Waiting) -> list[int]:
    return req.tokens[: req.logits_from]


def sort_fcfs(scheduler: "BatchScheduler") -> list[int]:
    return list(range(len(scheduler._waiting)))


def sort_lpm(scheduler: "BatchScheduler") -> list[int]:
    """Longest cached prefix first; ties keep arrival order. Past lpm_max_queue waiting: FCFS."""
    waiting = scheduler._waiting
    if len(waiting) > scheduler.lpm_max_queue:
        return sort_fcfs(scheduler)
    cached = [scheduler.cache.match_prefix(_match_key(req)).length for req in waiting]
    return sorted(range(len(waiting)), key=lambda i: -cached[i])


def _heaviest_first(node: Node, weight: dict[int, int]) -> list[Node]:
    """Children of `node` that hold waiting requests, heaviest first (ties: smaller first block)."""
    kids = [child for child in node.children.values() if child.id in weight]
    return sorted(kids, key=lambda child: (-weight[child.id], child.key))


def sort_dfs_weight(scheduler: "BatchScheduler") -> list[int]:
    """SGLang's DFS-weight: a node's weight is the number of waiting requests whose match ends in
    its subtree; walk the tree heaviest child first, emitting a node's requests after its children's."""
    cache = scheduler.cache
    ends = [cache.match_prefix(_match_key(req)).node for req in scheduler._waiting]
    at_node: dict[int, list[int]] = {}
    weight: dict[int, int] = {}
    for i, end in enumerate(ends):
        at_node.setdefault(end, []).append(i)
        n = cache.find(end, "schedule")
        while n is not None:
            weight[n.id] = weight.get(n.id, 0) + 1
            n = n.parent
    order: list[int] = []
    stack = [(cache.root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.extend(at_node.get(node.id, []))
            continue
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(_heaviest_first(node, weight)))
    return order


_SORTS = {Policy.LPM: sort_lpm, Policy.DFS_WEIGHT: sort_dfs_weight, Policy.FCFS: sort_fcfs}


def _parse_policy(policy: str) -> Policy:
    try:
        return Policy(policy)
    except ValueError:
        raise ValueError(f"BatchScheduler: unknown policy '{policy}'; use lpm, dfs-weight or fcfs") from None


class BatchScheduler:
    """Prefix-aware batch scheduler over a RadixCache (see `cai_fast.scheduler`)."""

    def __init__(self, cache: RadixCache, policy: str, token_budget: int, dedup_min_tokens: int = 32,
                 lpm_max_queue: int = 128):
        if cache is None:
            raise ValueError("BatchScheduler: cache is None; pass a RadixCache")
        self.policy = _parse_policy(policy)
        if token_budget < 1:
            raise ValueError(f"BatchScheduler: token_budget={token_budget} must be at least 1")
        if dedup_min_tokens < 0 or lpm_max_queue < 0:
            raise ValueError("BatchScheduler: dedup_min_tokens and lpm_max_queue must be >= 0")
        self.cache, self.token_budget = cache, token_budget
        self.dedup_min_tokens, self.lpm_max_queue = dedup_min_tokens, lpm_max_queue
        self._waiting: list[_Waiting] = []
        self._waiting_ids: set[int] = set()
        self._running: dict[int, _Running] = {}

    num_waiting = property(lambda self: len(self._waiting))
    num_running = property(lambda self: len(self._running))

    def add(self, request_id: int, tokens: Sequence[int], max_new_tokens: int = 0,
            logits_from: Optional[int] = None) -> None:
        """Queue a request: generation (max_new_tokens > 0) or scoring (0)."""
        name = f"add: request {request_id}"
        if request_id in self._waiting_ids or request_id in self._running:
            raise ValueError(f"{name} is already waiting or running; use a new id")
        tokens = list(tokens)
        if not tokens:
            raise ValueError(f"{name} has no tokens")
        if max_new_tokens < 0:
            raise ValueError(f"{name} has max_new_tokens={max_new_tokens} < 0")
        start = len(tokens) - 1 if logits_from is None else logits_from
        if not 0 <= start < len(tokens):
            raise ValueError(f"{name} has logits_from={start} outside [0, {len(tokens)})")
        self._waiting.append(_Waiting(request_id, tokens, max_new_tokens, start))
        self._waiting_ids.add(request_id)

    def _blocks_needed(self, req: _Waiting) -> int:
        return -(-(len(req.tokens) + req.max_new_tokens) // self.cache.block_size)

    def _fail_oversized(self) -> list[FailedRequest]:
        pool_blocks, failed = self.cache.pool.num_blocks, []
        for req in self._waiting:
            need = self._blocks_needed(req)
            if need > pool_blocks:
                failed.append(FailedRequest(req.id, (
                    f"request {req.id} needs {need} blocks ({len(req.tokens)} prompt tokens +"
                    f" {req.max_new_tokens} new tokens, {self.cache.block_size} tokens per block) but the"
                    f" whole pool has {pool_blocks}; raise the pool size or shorten the request")))
        self._keep_waiting({f.request_id for f in failed})
        return failed

    def _held_back(self, req: _Waiting, cached: int, batch: list[int]) -> bool:
        """In-batch prefix dedup: hold back a request that shares at least dedup_min_tokens
        uncached tokens (whole blocks) with a request already admitted to this batch."""
        if self.dedup_min_tokens == 0:
            return False
        bs, key = self.cache.block_size, _match_key(req)
        for other in batch:
            shared = _common_prefix(key, self._waiting[other].tokens) // bs * bs - cached
            if shared >= self.dedup_min_tokens:
                return True
        return False

    def _ensure_free(self, blocks: int) -> bool:
        pool = self.cache.pool
        if pool.num_free < blocks:
            self.cache.evict((blocks - pool.num_free) * self.cache.block_size)
        return pool.num_free >= blocks

    def _admit(self, req: _Waiting, match: MatchResult, out: list[ScheduledRequest]) -> bool:
        self.cache.lock(match.node)
        fresh = self._blocks_needed(req) - len(match.blocks)
        if not self._ensure_free(fresh):
            self.cache.unlock(match.node)
            return False
        table = match.blocks + self.cache.pool.alloc(fresh)
        out.append(ScheduledRequest(req.id, match.length, list(table), req.tokens[match.length :]))
        self._running[req.id] = _Running(req.tokens, table, match.length, match.node)
        return True

    def _keep_waiting(self, drop_ids: set[int]) -> None:
        self._waiting = [req for req in self._waiting if req.id not in drop_ids]
        self._waiting_ids -= drop_ids

    def schedule(self, max_requests: Optional[int] = None) -> ScheduleOutput:
        """Admit waiting requests in policy order until the token budget, the pool or
        max_requests runs out. A request bigger than the budget is admitted alone (no chunking)."""
        failed = self._fail_oversized()
        scheduled: list[ScheduledRequest] = []
        batch: list[int] = []
        budget = self.token_budget
        for i in _SORTS[self.policy](self):
            if max_requests is not None and len(batch) >= max_requests:
                break
            req = self._waiting[i]
            match = self.cache.match_prefix(_match_key(req))
            to_compute = len(req.tokens) - match.length
            if self._held_back(req, match.length, batch):
                continue  # stays waiting, hits the cache later
            if batch and to_compute > budget:
                break
            if not self._admit(req, match, scheduled):
                break
            batch.append(i)
            budget -= to_compute
            if budget <= 0:
                break
        self._keep_waiting({self._waiting[i].id for i in batch})
        return ScheduleOutput(scheduled, failed)

    def _running_request(self, request_id: int, caller: str) -> _Running:
        run = self._running.get(request_id)
        if run is None:
            raise ValueError(f"{caller}: request {request_id} is not running (unknown, still waiting,"
                             " or already finished)")
        return run

    def _check_tokens(self, request_id: int, run: _Running, tokens: list[int], caller: str) -> None:
        name = f"{caller}: request {request_id}"
        same = _common_prefix(run.tokens, tokens)
        if same < len(run.tokens):
            raise ValueError(f"{name}'s tokens do not extend its known tokens (first difference at position"
                             f" {same}); pass the prompt followed by the generated tokens")
        capacity = len(run.block_table) * self.cache.block_size
        if len(tokens) > capacity:
            raise ValueError(f"{name} has {len(tokens)} tokens but its blocks hold {capacity}"
                             " (prompt + max_new_tokens)")

    def _publish(self, run: _Running, tokens: list[int]) -> int:
        """Insert the whole blocks of `tokens` into the tree; free this request's private blocks
        that duplicate what another request cached meanwhile. Returns the tokens inserted."""
        bs = self.cache.block_size
        n = len(tokens) // bs * bs
        already = self.cache.insert(tokens[:n], run.block_table[: n // bs])
        self.cache.pool.free(run.block_table[run.cached_len // bs : already // bs])
        return n

    def cache_computed(self, request_id: int, tokens: Sequence[int]) -> list[int]:
        """Cache the whole blocks of a running request's computed tokens now (e.g. right after
        prefill) so that other requests hit them; returns its updated block table."""
        run = self._running_request(request_id, "cache_computed")
        tokens = list(tokens)
        self._check_tokens(request_id, run, tokens, "cache_computed")
        n = self._publish(run, tokens)
        match = self.cache.match_prefix(tokens[:n])
        self.cache.lock(match.node)
        self.cache.unlock(run.node)
        run.block_table[: len(match.blocks)] = match.blocks
        run.cached_len, run.node, run.tokens = n, match.node, tokens
        return list(run.block_table)

    def finish(self, request_id: int, tokens: Sequence[int]) -> None:
        """Cache the whole blocks of `tokens` (the tokens whose KV was computed), free the rest
        of the request's blocks and unlock its prefix."""
        run = self._running_request(request_id, "finish")
        tokens = list(tokens)
        self._check_tokens(request_id, run, tokens, "finish")
        n = self._publish(run, tokens)
        self.cache.pool.free(run.block_table[n // self.cache.block_size :])
        self.cache.unlock(run.node)
        del self._running[request_id]

    def abort(self, request_id: int) -> None:
        """Drop a waiting request, or release a running one without caching anything."""
        if request_id in self._waiting_ids:
            self._keep_waiting({request_id})
            return
        run = self._running_request(request_id, "abort")
        self.cache.pool.free(run.block_table[run.cached_len // self.cache.block_size :])
        self.cache.unlock(run.node)
        del self._running[request_id]
