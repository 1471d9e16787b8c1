"""The C++ scheduler and its pure-Python twin, driven side by side by hypothesis.

One RuleBasedStateMachine holds a cache + scheduler of each backend and applies every random
operation (alloc/free, insert, match, lock/unlock, evict, add/schedule/cache_computed/finish/
abort, including bad calls) to both. Results, or the exception type and message, must be equal
at every step, and both trees must pass check_integrity after every step.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cai_fast.scheduler import BACKENDS, HAVE_CORE, Policy, make_cache, make_scheduler

pytestmark = pytest.mark.skipif(not HAVE_CORE, reason="cai_fast._core is not built: nothing to compare with")

TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=20)  # a tiny vocabulary: prefixes collide


def plain(value):
    """Backend-independent form of a result, for comparison."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    for fields in (("length", "blocks", "node"), ("scheduled", "failed"),
                   ("request_id", "cached_len", "block_table", "tokens_to_compute"), ("request_id", "reason")):
        if all(hasattr(value, f) for f in fields):
            return tuple(plain(getattr(value, f)) for f in fields)
    return value


class Twins(RuleBasedStateMachine):
    @initialize(block_size=st.sampled_from([1, 2, 3, 4]), num_blocks=st.integers(4, 40),
                policy=st.sampled_from(list(Policy)), budget=st.integers(3, 40),
                dedup=st.sampled_from([0, 2, 4]), lpm_max_queue=st.sampled_from([2, 128]))
    def setup(self, block_size, num_blocks, policy, budget, dedup, lpm_max_queue):
        self.caches = [make_cache(num_blocks, block_size, backend) for backend in BACKENDS]
        self.schedulers = [make_scheduler(c, budget, policy, dedup, lpm_max_queue) for c in self.caches]
        self.block_size, self.num_blocks = block_size, num_blocks
        self.held: list[int] = []  # private blocks this machine allocated (same ids in both)
        self.nodes: list[int] = [0]  # handles from match results, newest first (some may be stale)
        self.locks: list[int] = []  # locks this machine holds
        self.prompts: dict[int, list[int]] = {}  # id -> prompt, for every request added
        self.waiting: set[int] = set()
        self.running: dict[int, tuple[list[int], list[int]]] = {}  # id -> (known tokens, block table)
        self.next_id = 0

    def both(self, call):
        """Apply `call` to (cache, scheduler) of each backend; the outcomes must be equal."""
        outcomes = []
        for cache, scheduler in zip(self.caches, self.schedulers):
            try:
                outcomes.append(("ok", plain(call(cache, scheduler))))
            except (ValueError, RuntimeError) as error:
                outcomes.append((type(error).__name__, str(error)))
        assert outcomes[0] == outcomes[1]
        return outcomes[0]

    def any_block_but_the_schedulers(self, data):
        """A block id, maybe bad (out of range, free, cached), never one a running request holds."""
        theirs = {b for _, table in self.running.values() for b in table}
        return data.draw(st.sampled_from([b for b in range(-1, self.num_blocks + 1) if b not in theirs]))

    @rule(n=st.integers(0, 3))
    def alloc(self, n):
        status, ids = self.both(lambda c, s: c.pool.alloc(n))
        if status == "ok":
            self.held += ids

    @rule(data=st.data())
    def free(self, data):
        if self.held and data.draw(st.integers(0, 3)) != 0:  # mostly a valid free
            picks = data.draw(st.lists(st.sampled_from(self.held), min_size=1, max_size=len(self.held)))
        else:
            picks = [self.any_block_but_the_schedulers(data)]
        if self.both(lambda c, s: c.pool.free(picks))[0] == "ok":
            self.held = [b for b in self.held if b not in picks]

    @rule(tokens=TOKENS, data=st.data())
    def insert(self, tokens, data):
        status, blocks = self.both(lambda c, s: c.pool.alloc(len(tokens) // self.block_size))
        if status != "ok":
            return
        self.held += blocks
        if blocks and data.draw(st.integers(0, 4)) == 0:  # a bad id now and then
            blocks = blocks[:-1] + [self.any_block_but_the_schedulers(data)]
        status, already = self.both(lambda c, s: c.insert(tokens, blocks))
        if status == "ok":
            taken = set(blocks[already // self.block_size:])
            self.held = [b for b in self.held if b not in taken]
            duplicates = [b for b in blocks[: already // self.block_size] if b in self.held]
            self.both(lambda c, s: c.pool.free(duplicates))  # as a caller must
            self.held = [b for b in self.held if b not in duplicates]

    @rule(tokens=TOKENS)
    def match(self, tokens):
        node = self.both(lambda c, s: c.match_prefix(tokens))[1][2]
        self.nodes = [node] + self.nodes[:15]  # newest first: hypothesis draws early entries most

    @rule(data=st.data())
    def lock(self, data):
        node = data.draw(st.sampled_from(self.nodes))
        if self.both(lambda c, s: c.lock(node))[0] == "ok":
            self.locks.append(node)

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data):
        node = data.draw(st.sampled_from(self.locks))
        assert self.both(lambda c, s: c.unlock(node))[0] == "ok"
        self.locks.remove(node)

    @precondition(lambda self: not self.locks and not self.running and any(self.nodes))
    @rule(data=st.data())
    def unlock_below_zero(self, data):
        node = data.draw(st.sampled_from([n for n in self.nodes if n]))  # not the root
        assert self.both(lambda c, s: c.unlock(node))[0] == "ValueError"

    @rule(n=st.integers(-1, 24))
    def evict(self, n):
        self.both(lambda c, s: c.evict(n))

    @rule(requests=st.lists(st.tuples(TOKENS, st.integers(0, 6), st.integers(1, 3)), min_size=1, max_size=4),
          reuse=st.booleans(), data=st.data())
    def add(self, requests, reuse, data):
        for tokens, max_new, logits_back in requests:
            if self.prompts and data.draw(st.booleans()):  # a follow-up extending an earlier prompt
                tokens = self.prompts[data.draw(st.sampled_from(sorted(self.prompts)))] + tokens
            rid = self.next_id - 1 if reuse else self.next_id  # reuse: a duplicate id, refused
            self.next_id += not reuse
            logits_from = max(0, len(tokens) - logits_back)
            if self.both(lambda c, s: s.add(rid, tokens, max_new, logits_from))[0] == "ok":
                self.prompts[rid] = tokens
                self.waiting.add(rid)

    @rule(max_requests=st.sampled_from([None, 1, 3]), data=st.data())
    def schedule(self, max_requests, data):
        """Schedule a batch, then finish or cache_computed some of the running requests."""
        scheduled, failed = self.both(lambda c, s: s.schedule(max_requests))[1]
        for rid, _cached_len, table, _to_compute in scheduled:
            self.running[rid] = (self.prompts[rid], table)
        self.waiting -= {rid for rid, *_ in scheduled} | {rid for rid, _reason in failed}
        for rid in data.draw(st.lists(st.sampled_from(sorted(self.running)), unique=True)) if self.running else []:
            self.finish_or_cache_one(data, rid, data.draw(st.booleans()))

    def finish_or_cache_one(self, data, rid, finish):
        known, table = self.running[rid]
        room = len(table) * self.block_size - len(known)
        tokens = known + data.draw(st.lists(st.integers(0, 2), max_size=room + 1))  # may overflow: refused
        if data.draw(st.integers(0, 9)) == 0:
            tokens = tokens[:-1] + [7]  # may change a known token: refused
        if finish:
            if self.both(lambda c, s: s.finish(rid, tokens))[0] == "ok":
                del self.running[rid]
        else:
            status, new_table = self.both(lambda c, s: s.cache_computed(rid, tokens))
            if status == "ok":
                self.running[rid] = (tokens, new_table)

    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from([-1] + sorted(self.waiting) + sorted(self.running)))
        if self.both(lambda c, s: s.abort(rid))[0] == "ok":
            self.running.pop(rid, None)
            self.waiting.discard(rid)

    @invariant()
    def twins_agree_and_hold_together(self):
        for cache in self.caches:
            cache.check_integrity()
        views = [(c.evictable_size, c.protected_size, c.total_size, c.pool.num_free, s.num_waiting, s.num_running)
                 for c, s in zip(self.caches, self.schedulers)]
        assert views[0] == views[1]


Twins.TestCase.settings = settings(max_examples=150, stateful_step_count=100, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestTwins = Twins.TestCase


def serve_until_idle(caches, schedulers, prompts, rng):
    """Schedule and finish on both backends until nothing waits; returns (cached tokens, evicted?)."""
    cached_tokens, evicted, size_before = 0, False, caches[0].total_size
    while schedulers[0].num_waiting:
        outs = [plain(s.schedule()) for s in schedulers]
        assert outs[0] == outs[1] and outs[0][0]  # all finished: the pool has room for the next
        for rid, cached_len, *_ in outs[0][0]:
            prompt, max_new = prompts[rid]
            computed = prompt + [rng.randrange(5000) for _ in range(rng.randrange(0, max_new + 1))]
            for scheduler in schedulers:
                scheduler.finish(rid, computed)
            cached_tokens += cached_len
        for cache in caches:
            cache.check_integrity()
        assert (caches[0].total_size, caches[0].pool.num_free) == (caches[1].total_size, caches[1].pool.num_free)
        evicted |= caches[0].total_size < size_before
        size_before = caches[0].total_size
    return cached_tokens, evicted


@pytest.mark.parametrize("policy", list(Policy))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_twins_agree_on_a_few_shot_workload_under_memory_pressure(policy, block_size):
    """24 follow-up chains over a shared 120-token few-shot prefix, in a pool too small for all."""
    rng = random.Random(block_size)
    few_shot = [rng.randrange(5000) for _ in range(120)]
    caches = [make_cache(960 // block_size, block_size, backend) for backend in BACKENDS]
    schedulers = [make_scheduler(c, 400, policy, dedup_min_tokens=16) for c in caches]
    chains = [few_shot + [rng.randrange(5000) for _ in range(rng.randrange(10, 60))] for _ in range(24)]
    prompts, cached_tokens, evicted = {}, 0, False
    for _round in range(4):
        for chain in chains:
            chain += [rng.randrange(5000) for _ in range(rng.randrange(5, 40))]
            rid, max_new = len(prompts), rng.randrange(0, 24)
            prompts[rid] = (list(chain), max_new)
            for scheduler in schedulers:
                scheduler.add(rid, chain, max_new_tokens=max_new)
        cached, evicted_now = serve_until_idle(caches, schedulers, prompts, rng)
        cached_tokens, evicted = cached_tokens + cached, evicted or evicted_now
    assert evicted and cached_tokens > 24 * 3 * 120  # the pool could not keep everything; prefixes hit
