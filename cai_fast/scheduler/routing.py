"""Routing requests among several servers: cache-aware by longest prefix, with load balance.

    Router(num_servers, RoutingConfig()).route(tokens) -> server index, in flight there until .done(server)
    Router.loads: requests routed to each server and not yet done

Policy "prefix" (SGLang's cache-aware router over our radix tree) sends each request to the server that already
holds its longest prefix unless that server is overloaded (rules: `Router`), so each prefix is computed on one
server once; policy "round-robin" sends the requests to the servers in turn. Integers only, like the rest of
cai_fast.scheduler; not thread-safe (route from one thread).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from cai_fast.scheduler import make_cache

ROUTING = ("prefix", "round-robin")


@dataclass(frozen=True)
class RoutingConfig:
    """How requests are spread over servers; the defaults suit a few servers with ~8 requests each in flight."""

    policy: str = field(default="prefix", metadata={"help": "prefix (cache-aware) or round-robin"})
    block_size: int = field(default=16, metadata={"help": "tokens per block of the routing trees"})
    cache_tokens: int = field(default=1 << 20, metadata={"help": "tokens remembered per server"})
    match_ratio: float = field(default=0.5, metadata={"help": "share of a request a match must cover"})
    balance_abs: int = field(default=4, metadata={"help": "load gap (requests) that overrides the match"})
    balance_rel: float = field(default=1.5, metadata={"help": "load ratio that, with balance_abs, overrides it"})

    def __post_init__(self):
        if self.policy not in ROUTING:
            raise ValueError(f"routing policy {self.policy!r} is unknown; use one of {', '.join(ROUTING)}")
        if self.block_size < 1 or self.cache_tokens < self.block_size or self.balance_abs < 0:
            raise ValueError(f"RoutingConfig: block_size >= 1, cache_tokens >= block_size and balance_abs >= 0 "
                             f"needed, got {self.block_size}, {self.cache_tokens}, {self.balance_abs}")
        if not 0 <= self.match_ratio <= 1 or self.balance_rel < 1:
            raise ValueError(f"RoutingConfig: match_ratio in [0, 1] and balance_rel >= 1 needed, got "
                             f"{self.match_ratio}, {self.balance_rel}")


class Router:
    """Chooses the server of each request (see the module docstring).

    Policy "prefix": the router keeps, per server, a radix tree (cai_fast.scheduler's RadixCache,
    whole blocks only) of the tokens it sent there — an approximate picture of that server's prefix
    cache, least recently used prefixes forgotten past `cache_tokens`. A request goes to

      1. the least loaded server, when loads are uneven: max - min > balance_abs and
         max > balance_rel * min;
      2. else the server whose tree matches the longest prefix of the request, when that match
         covers at least `match_ratio` of its tokens (ties: the less loaded, then the lower index);
      3. else the least loaded server (ties: the lower index).

    Policy "round-robin" sends the requests to the servers in turn: the comparison, and what a
    plain load balancer does.
    """

    def __init__(self, num_servers: int, config: RoutingConfig = RoutingConfig()):
        if num_servers < 1:
            raise ValueError(f"Router needs at least one server, got {num_servers}")
        self.config = config
        self.loads = [0] * num_servers
        self.trees = [make_cache(config.cache_tokens // config.block_size, config.block_size)
                      for _ in range(num_servers)]
        self._turn = itertools.cycle(range(num_servers))

    def route(self, tokens: list[int]) -> int:
        """The server for a request of these token ids; counted as in flight there."""
        server = next(self._turn) if self.config.policy == "round-robin" else self._by_prefix(tokens)
        self._remember(server, tokens)
        self.loads[server] += 1
        return server

    def done(self, server: int) -> None:
        """A request routed to `server` has finished (or failed)."""
        if self.loads[server] < 1:
            raise ValueError(f"Router.done: server {server} has no request in flight")
        self.loads[server] -= 1

    def _by_prefix(self, tokens: list[int]) -> int:
        low, high = min(self.loads), max(self.loads)
        least_loaded = self.loads.index(low)
        if high - low > self.config.balance_abs and high > self.config.balance_rel * low:
            return least_loaded
        matched = [tree.match_prefix(tokens).length for tree in self.trees]
        best = max(range(len(self.trees)), key=lambda s: (matched[s], -self.loads[s], -s))
        if matched[best] > 0 and matched[best] >= self.config.match_ratio * len(tokens):
            return best
        return least_loaded

    def _remember(self, server: int, tokens: list[int]) -> None:
        """Insert the request's whole blocks into the server's tree, forgetting LRU prefixes for room."""
        tree, bs = self.trees[server], self.config.block_size
        blocks = min(len(tokens) // bs, tree.pool.num_blocks)
        if tree.pool.num_free < blocks:
            tree.evict((blocks - tree.pool.num_free) * bs)
        match = tree.match_prefix(tokens[: blocks * bs])
        fresh = tree.pool.alloc(min(blocks - len(match.blocks), tree.pool.num_free))
        kept = len(match.blocks) + len(fresh)
        if fresh:
            tree.insert(tokens[: kept * bs], list(match.blocks) + fresh)
