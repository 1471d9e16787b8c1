"""Unit tests of the block pool, radix cache and batch scheduler, run against both backends."""

from __future__ import annotations

import random
import re

import pytest

import cai_fast.scheduler as sched
from cai_fast.scheduler import BACKENDS, HAVE_CORE, Policy, backend_of, make_cache, make_pool, make_scheduler


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpp" and not HAVE_CORE:
        pytest.skip("cai_fast._core is not built (pip install -e . builds it)")
    return request.param


def random_tokens(rng: random.Random, n: int, vocab: int = 50) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def cached_insert(cache, tokens):
    """Insert `tokens` with fresh blocks, free the duplicates as a caller must; return already."""
    nblocks = len(tokens) // cache.block_size
    blocks = cache.pool.alloc(nblocks)
    already = cache.insert(tokens, blocks)
    cache.pool.free(blocks[: already // cache.block_size])
    return already


def lcp(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ----------------------------------------------------------------------------- block pool


def test_pool_allocates_in_order_and_reuses_freed_blocks_last_in_first_out(backend):
    pool = make_pool(7, 3, backend)
    assert pool.alloc(3) == [0, 1, 2]
    pool.free([1, 0])
    assert pool.num_free == 6 and pool.num_blocks == 7 and pool.block_size == 3
    assert pool.alloc(3) == [0, 1, 3]


def test_pool_errors_name_the_problem_and_free_nothing(backend):
    pool = make_pool(64, 4, backend)
    held = pool.alloc(61)
    message = "asked for 12 blocks, 3 free of 64; evict or raise the pool size"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        pool.alloc(12)
    pool.free([held[5]])
    bad_calls = [([held[1], 64], "block 64 is out of range [0, 64)"), ([held[1], -1], "block -1 is out of range"),
                 ([held[1], held[5]], "already free (double free)"), ([held[1], held[0], held[0]], "appears twice")]
    for bad_ids, message in bad_calls:
        with pytest.raises(ValueError, match=re.escape(message)):
            pool.free(bad_ids)
    assert pool.num_free == 4  # the failed calls freed nothing, not even held[1]
    with pytest.raises(ValueError, match="num_blocks=0"):
        make_pool(0, 4, backend)
    with pytest.raises(ValueError, match="block_size=0"):
        make_pool(4, 0, backend)


def test_pool_refuses_to_free_a_block_the_cache_owns(backend):
    cache = make_cache(9, 2, backend)
    blocks = cache.pool.alloc(2)
    cache.insert([5, 6, 7, 8, 9], blocks)
    with pytest.raises(ValueError, match=f"block {blocks[1]} is owned by the prefix cache; only evict frees it"):
        cache.pool.free([blocks[1]])


# ----------------------------------------------------------------------------- radix cache


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_match_equals_longest_whole_block_prefix_over_inserted_sequences(backend, block_size):
    rng = random.Random(block_size)
    cache = make_cache(4000, block_size, backend)
    base = random_tokens(rng, 5 * block_size + 3, vocab=3)
    inserted = []
    for _ in range(30):  # sequences branching off a shared base at random (unaligned) points
        seq = base[: rng.randrange(len(base))] + random_tokens(rng, rng.randrange(1, 4 * block_size + 5), vocab=3)
        whole = len(seq) // block_size * block_size
        expect = max([lcp(s, seq[:whole]) // block_size * block_size for s in inserted] + [0])
        assert cached_insert(cache, seq) == expect
        inserted.append(seq[:whole])
        cache.check_integrity()
    for _ in range(40):
        query = base[: rng.randrange(len(base))] + random_tokens(rng, rng.randrange(0, 9), vocab=3)
        match = cache.match_prefix(query)
        assert match.length == max(lcp(s, query) // block_size * block_size for s in inserted)
        assert match.length % block_size == 0 and len(match.blocks) == match.length // block_size
    cache.check_integrity()
    assert cache.total_size == cache.evictable_size == (4000 - cache.pool.num_free) * block_size


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_split_at_a_block_boundary_keeps_blocks_and_handles(backend, block_size):
    rng = random.Random(7)
    cache = make_cache(64, block_size, backend)
    a = random_tokens(rng, 3 * block_size + block_size // 2)  # a trailing partial block
    blocks = cache.pool.alloc(3)
    assert cache.insert(a, blocks) == 0
    whole_a = cache.match_prefix(a)
    assert (whole_a.length, whole_a.blocks) == (3 * block_size, blocks)
    b = a[: block_size + block_size // 2] + [999] * 2 * block_size  # diverges mid-block 2
    half = cache.match_prefix(b)  # ends inside a's node: splits it after one block
    assert (half.length, half.blocks) == (block_size, blocks[:1])
    assert half.node != whole_a.node
    again = cache.match_prefix(a)
    assert (again.length, again.blocks, again.node) == (3 * block_size, blocks, whole_a.node)
    assert cached_insert(cache, b) == block_size
    cache.check_integrity()


def test_insert_reports_the_cached_part_and_the_caller_frees_duplicates(backend):
    cache = make_cache(32, 4, backend)
    prompt = list(range(100, 118))  # 4 whole blocks + 2 tokens
    first = cache.pool.alloc(4)
    assert cache.insert(prompt, first) == 0
    second = cache.pool.alloc(5)
    assert cache.insert(prompt + [1, 2, 3, 4, 5], second) == 16  # 16 tokens were there already
    cache.pool.free(second[:4])  # the duplicates; the tree took second[4]
    assert cache.match_prefix(prompt + [1, 2, 3, 4]).blocks == first + [second[4]]
    assert cache.total_size == 20 and cache.pool.num_free == 32 - 5
    cache.check_integrity()


def test_insert_errors(backend):
    cache = make_cache(16, 4, backend)
    blocks = cache.pool.alloc(2)
    with pytest.raises(ValueError, match=re.escape("insert: 9 tokens make 2 whole blocks of 4 but 3 block ids")):
        cache.insert(list(range(9)), blocks + [7])
    with pytest.raises(ValueError, match="insert: block 9 is free"):
        cache.insert(list(range(8)), [blocks[0], 9])
    with pytest.raises(ValueError, match="insert: block 0 appears twice"):
        cache.insert(list(range(8)), [0, 0])
    with pytest.raises(ValueError, match=re.escape("insert: block 16 is out of range [0, 16)")):
        cache.insert(list(range(8)), [0, 16])
    cache.insert(list(range(8)), blocks)
    other = cache.pool.alloc(1)
    with pytest.raises(ValueError, match=f"insert: block {blocks[0]} is already owned by the prefix cache"):
        cache.insert([50, 51, 52, 53, 54, 55, 56, 57], [other[0], blocks[0]])
    cache.check_integrity()


def test_evict_frees_least_recently_used_unlocked_leaves_first(backend):
    cache = make_cache(32, 2, backend)
    seqs = {name: [first] * 4 for name, first in [("a", 1), ("b", 2), ("c", 3)]}
    blocks = {}
    for name, seq in seqs.items():
        blocks[name] = cache.pool.alloc(2)
        cache.insert(seq, blocks[name])
    cache.match_prefix(seqs["a"])  # a is now the most recently used
    assert cache.evict(1) == blocks["b"]  # whole leaf: frees 2 blocks (4 tokens) for 1 token asked
    locked = cache.match_prefix(seqs["c"]).node
    cache.lock(locked)
    assert cache.evict(100) == blocks["a"]  # c is locked
    assert (cache.evictable_size, cache.protected_size, cache.total_size) == (0, 4, 4)
    cache.unlock(locked)
    assert cache.evict(0) == [] and cache.evict(4) == blocks["c"]
    with pytest.raises(ValueError, match="evict: num_tokens=-1 must be >= 0"):
        cache.evict(-1)
    cache.check_integrity()


def test_evict_makes_a_parent_an_evictable_leaf(backend):
    cache = make_cache(32, 1, backend)
    base = [4, 4, 4]
    cached_insert(cache, base)
    parent_blocks = cache.match_prefix(base).blocks
    cached_insert(cache, base + [5, 5])
    child_blocks = cache.match_prefix(base + [5, 5]).blocks[3:]
    cached_insert(cache, [9])  # older than both after the matches below
    cache.match_prefix(base + [5, 5])
    lone = cache.match_prefix([9]).blocks
    assert cache.evict(3) == child_blocks + parent_blocks  # the child, then its parent
    assert cache.evict(1) == lone
    assert cache.total_size == 0 and cache.pool.num_free == 32
    cache.check_integrity()


def test_lock_counts_go_up_the_path_and_unlock_below_zero_raises(backend):
    cache = make_cache(32, 2, backend)
    cached_insert(cache, [1, 1, 2, 2, 3, 3])
    deep = cache.match_prefix([1, 1, 2, 2, 3, 3]).node
    shallow = cache.match_prefix([1, 1, 7, 7]).node  # splits: [1 1] | [2 2 3 3]
    cache.lock(deep)
    cache.lock(shallow)
    cache.lock(deep)
    assert (cache.protected_size, cache.evictable_size) == (6, 0)
    cache.unlock(deep)
    cache.unlock(deep)
    assert (cache.protected_size, cache.evictable_size) == (2, 4)
    with pytest.raises(ValueError, match=f"unlock: node {deep} is not locked"):
        cache.unlock(deep)
    cache.unlock(shallow)
    cache.evict(100)
    with pytest.raises(ValueError, match=f"lock: node {deep} is not in the cache"):
        cache.lock(deep)
    cache.lock(0)  # the root: a no-op
    cache.unlock(0)
    cache.check_integrity()


def test_a_lock_taken_before_a_split_still_protects_the_whole_path(backend):
    cache = make_cache(32, 2, backend)
    cached_insert(cache, [1, 1, 2, 2, 3, 3])
    node = cache.match_prefix([1, 1, 2, 2, 3, 3]).node
    cache.lock(node)
    cached_insert(cache, [1, 1, 2, 2, 8, 8])  # splits the locked node
    branch = cache.match_prefix([1, 1, 2, 2, 8, 8]).blocks[2:]
    assert cache.evict(100) == branch
    assert cache.protected_size == 6
    cache.unlock(node)
    assert cache.protected_size == 0 and cache.evictable_size == 6
    cache.check_integrity()


def test_check_integrity_catches_a_broken_lock_count(backend):
    cache = make_cache(16, 1, backend)
    cached_insert(cache, [1, 2, 3])
    cached_insert(cache, [1, 2, 4])
    child = cache.match_prefix([1, 2, 3]).node
    cache.check_integrity()
    cache._debug_set_lock_ref(child, 1)  # locked without its parent, sizes not moved
    with pytest.raises(RuntimeError, match="radix cache integrity: node .* lock count 0 below its children's total 1"):
        cache.check_integrity()


def test_check_integrity_catches_broken_sizes(backend):
    cache = make_cache(16, 1, backend)
    cached_insert(cache, [1, 2, 3])
    cache._debug_set_lock_ref(cache.match_prefix([1, 2, 3]).node, 2)
    with pytest.raises(RuntimeError, match="evictable/protected sizes are 3/0 but the nodes add up to 0/3"):
        cache.check_integrity()


# ----------------------------------------------------------------------------- scheduler


def table(out):
    return [(r.request_id, r.cached_len, list(r.block_table), list(r.tokens_to_compute)) for r in out.scheduled]


def ids(out):
    return [r.request_id for r in out.scheduled]


def test_budget_is_respected_and_an_oversized_request_goes_alone(backend):
    rng = random.Random(3)
    cache = make_cache(4096, 4, backend)
    scheduler = make_scheduler(cache, token_budget=100, policy="fcfs", dedup_min_tokens=0)
    lengths = [rng.randrange(5, 60) for _ in range(25)] + [250] + [rng.randrange(5, 60) for _ in range(5)]
    for i, n in enumerate(lengths):
        scheduler.add(i, random_tokens(rng, n, vocab=1000), max_new_tokens=rng.randrange(0, 9))
    seen = []
    while scheduler.num_waiting:
        out = scheduler.schedule()
        computed = [len(r.tokens_to_compute) for r in out.scheduled]
        assert sum(computed) <= 100 or computed == [250]
        seen += ids(out)
        for r in out.scheduled:
            scheduler.finish(r.request_id, list(r.tokens_to_compute))
        cache.check_integrity()
    assert seen == list(range(len(lengths)))  # FCFS, nothing lost


def test_block_table_covers_prompt_and_new_tokens(backend):
    cache = make_cache(64, 4, backend)
    scheduler = make_scheduler(cache, token_budget=1000)
    prompt = list(range(30, 43))  # 13 tokens
    scheduler.add(1, prompt, max_new_tokens=7)
    [r] = scheduler.schedule().scheduled
    assert len(r.block_table) == 5 and r.cached_len == 0 and list(r.tokens_to_compute) == prompt
    scheduler.finish(1, prompt + [1, 2, 3, 4, 5, 6])  # 19 computed tokens: 4 whole blocks cached
    assert cache.total_size == 16 and cache.pool.num_free == 60
    scheduler.add(2, prompt + [1, 2, 3, 4, 5, 6, 7])
    [r2] = scheduler.schedule().scheduled
    assert r2.cached_len == 16 and list(r2.block_table[:4]) == list(r.block_table[:4])
    cache.check_integrity()


def hand_built_tree(backend, policy):
    """Cached [1 1 1 1] and [2 2 2 2]; five waiting requests (see the DFS-weight test)."""
    cache = make_cache(64, 1, backend)
    cached_insert(cache, [1, 1, 1, 1])
    cached_insert(cache, [2, 2, 2, 2])
    scheduler = make_scheduler(cache, token_budget=1000, policy=policy, dedup_min_tokens=0)
    for rid, tokens in enumerate([[2, 2, 2, 2, 9], [1, 1, 1, 1, 5], [1, 1, 1, 1, 6], [7, 7], [1, 1, 8, 8]]):
        scheduler.add(rid, tokens)
    return scheduler


def test_policy_orders_on_a_hand_built_tree(backend):
    # cached lengths: r0 4, r1 4, r2 4, r3 0, r4 2 (r4 splits [1 1 1 1] into [1 1] | [1 1]).
    assert ids(hand_built_tree(backend, Policy.FCFS).schedule()) == [0, 1, 2, 3, 4]
    assert ids(hand_built_tree(backend, Policy.LPM).schedule()) == [0, 1, 2, 4, 3]
    # DFS weights: [1 1] has 3 requests below it (r1, r2 under [1 1 | 1 1], r4 at it), [2 2 2 2]
    # has 1, so the walk takes [1 1] first: r1 r2 (deeper node first), r4, then r0, then r3 at
    # the root.
    assert ids(hand_built_tree(backend, "dfs-weight").schedule()) == [1, 2, 4, 0, 3]


def test_lpm_falls_back_to_fcfs_past_the_queue_limit(backend):
    cache = make_cache(64, 1, backend)
    cached_insert(cache, [3, 3, 3])
    scheduler = make_scheduler(cache, token_budget=1000, policy="lpm", dedup_min_tokens=0, lpm_max_queue=2)
    for rid, tokens in enumerate([[8, 8], [3, 3, 3, 3], [3, 3, 5]]):
        scheduler.add(rid, tokens)
    assert ids(scheduler.schedule()) == [0, 1, 2]


def test_in_batch_dedup_holds_back_sharers_until_the_prefix_is_cached(backend):
    rng = random.Random(11)
    cache = make_cache(256, 4, backend)
    scheduler = make_scheduler(cache, token_budget=10_000, policy="lpm", dedup_min_tokens=32)
    shared = random_tokens(rng, 45)
    prompts = [shared + random_tokens(rng, 9) for _ in range(3)] + [random_tokens(rng, 20)]
    for rid, prompt in enumerate(prompts):
        scheduler.add(rid, prompt, max_new_tokens=3)
    first = scheduler.schedule()
    assert ids(first) == [0, 3] and scheduler.num_waiting == 2
    scheduler.finish(0, prompts[0])
    second = scheduler.schedule()
    assert ids(second) == [1, 2] and [r.cached_len for r in second.scheduled] == [44, 44]
    cache.check_integrity()


def test_cache_computed_lets_sharers_hit_before_the_first_request_finishes(backend):
    rng = random.Random(5)
    cache = make_cache(64, 4, backend)
    scheduler = make_scheduler(cache, token_budget=1000, dedup_min_tokens=8)
    shared = random_tokens(rng, 20)
    scheduler.add(0, shared + [1, 2, 3], max_new_tokens=8)
    scheduler.add(1, shared + [4, 5, 6], max_new_tokens=8)
    [r0] = scheduler.schedule().scheduled
    assert r0.request_id == 0
    table0 = scheduler.cache_computed(0, shared + [1, 2, 3])
    assert list(table0) == list(r0.block_table) and cache.protected_size == 20
    [r1] = scheduler.schedule().scheduled
    assert r1.cached_len == 20 and list(r1.block_table[:5]) == list(table0[:5])
    scheduler.finish(1, shared + [4, 5, 6, 7])
    scheduler.finish(0, shared + [1, 2, 3, 9, 9, 9, 9, 9])
    assert cache.protected_size == 0 and cache.pool.num_free == 64 - cache.total_size // 4
    cache.check_integrity()


def test_cache_computed_swaps_duplicate_blocks_for_the_cached_ones(backend):
    cache = make_cache(64, 2, backend)
    scheduler = make_scheduler(cache, token_budget=1000, dedup_min_tokens=0)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    scheduler.add(0, prompt)
    scheduler.add(1, prompt)  # admitted together: both compute the same prefix
    r0, r1 = scheduler.schedule().scheduled
    scheduler.finish(0, prompt)
    free_before = cache.pool.num_free
    new_table = scheduler.cache_computed(1, prompt)
    assert list(new_table[:3]) == list(r0.block_table[:3]) and list(new_table[3:]) == list(r1.block_table[3:])
    assert cache.pool.num_free == free_before + 3
    scheduler.finish(1, prompt)
    cache.check_integrity()


def test_tiny_pool_evicts_then_waits_then_fails_only_what_cannot_fit(backend):
    rng = random.Random(9)
    cache = make_cache(12, 4, backend)  # 48 tokens in all
    scheduler = make_scheduler(cache, token_budget=1000, dedup_min_tokens=0)
    for rid in range(6):
        prompt = random_tokens(rng, 17)
        scheduler.add(rid, prompt, max_new_tokens=3)  # 5 blocks each
        assert ids(scheduler.schedule()) == [rid]
        scheduler.finish(rid, prompt + [1, 2])
        cache.check_integrity()
    assert cache.total_size <= 48 and cache.pool.num_free + cache.total_size // 4 == 12
    scheduler.add(10, random_tokens(rng, 30), max_new_tokens=2)  # 8 blocks
    scheduler.add(11, random_tokens(rng, 30), max_new_tokens=2)  # does not fit beside 10
    scheduler.add(12, random_tokens(rng, 60), max_new_tokens=0)  # 15 blocks: never fits
    out = scheduler.schedule()
    assert ids(out) == [10] and scheduler.num_waiting == 1
    [failed] = out.failed
    assert failed.request_id == 12
    assert failed.reason == ("request 12 needs 15 blocks (60 prompt tokens + 0 new tokens, 4 tokens per block)"
                             " but the whole pool has 12; raise the pool size or shorten the request")
    scheduler.abort(10)
    assert ids(scheduler.schedule()) == [11]
    cache.check_integrity()


def test_logits_from_limits_what_the_cache_serves(backend):
    cache = make_cache(64, 1, backend)
    cached_insert(cache, list(range(10)))
    scheduler = make_scheduler(cache, token_budget=1000)
    scheduler.add(0, list(range(10)))  # the last token is always computed
    scheduler.add(1, list(range(10)), logits_from=6)  # scoring tokens 7..9 needs logits from 6 on
    out = scheduler.schedule()
    assert [(r.request_id, r.cached_len) for r in out.scheduled] == [(0, 9), (1, 6)]


def test_max_requests_caps_a_batch(backend):
    scheduler = make_scheduler(make_cache(64, 2, backend), token_budget=1000, policy="fcfs")
    for rid in range(5):
        scheduler.add(rid, [rid] * 3)
    assert ids(scheduler.schedule(max_requests=2)) == [0, 1]
    assert ids(scheduler.schedule(max_requests=0)) == []
    assert ids(scheduler.schedule()) == [2, 3, 4]


def test_abort_releases_blocks_and_locks(backend):
    cache = make_cache(32, 2, backend)
    cached_insert(cache, [1, 2, 3, 4])
    scheduler = make_scheduler(cache, token_budget=1000)
    scheduler.add(0, [1, 2, 3, 4, 5, 6], max_new_tokens=4)
    scheduler.add(1, [9, 9])
    scheduler.schedule(max_requests=1)
    assert cache.protected_size == 4
    scheduler.abort(0)
    scheduler.abort(1)
    assert (scheduler.num_running, scheduler.num_waiting, cache.protected_size) == (0, 0, 0)
    assert cache.pool.num_free == 30
    cache.check_integrity()


@pytest.mark.parametrize("call, message", [
    (lambda s: s.finish(42, [1]), "finish: request 42 is not running (unknown, still waiting, or already finished)"),
    (lambda s: s.abort(42), "abort: request 42 is not running"),
    (lambda s: s.cache_computed(7, [1, 2]), "cache_computed: request 7 is not running"),
    (lambda s: s.add(7, [3]), "add: request 7 is already waiting or running; use a new id"),
    (lambda s: s.add(8, []), "add: request 8 has no tokens"),
    (lambda s: s.add(8, [1, 2], max_new_tokens=-1), "add: request 8 has max_new_tokens=-1 < 0"),
    (lambda s: s.add(8, [1, 2], logits_from=2), "add: request 8 has logits_from=2 outside [0, 2)"),
])
def test_scheduler_errors(backend, call, message):
    scheduler = make_scheduler(make_cache(8, 2, backend), token_budget=10)
    scheduler.add(7, [1, 2, 3])
    with pytest.raises(ValueError, match=re.escape(message)):
        call(scheduler)


def test_finish_errors_on_tokens_that_do_not_belong(backend):
    scheduler = make_scheduler(make_cache(8, 2, backend), token_budget=10)
    scheduler.add(7, [1, 2, 3], max_new_tokens=1)
    scheduler.schedule()
    with pytest.raises(ValueError, match=re.escape("finish: request 7's tokens do not extend its known tokens"
                                                   " (first difference at position 1)")):
        scheduler.finish(7, [1, 5, 3])
    with pytest.raises(ValueError, match=re.escape("finish: request 7 has 5 tokens but its blocks hold 4")):
        scheduler.finish(7, [1, 2, 3, 4, 5])
    scheduler.finish(7, [1, 2, 3, 4])


def test_constructor_errors(backend):
    cache = make_cache(8, 2, backend)
    with pytest.raises(ValueError, match="unknown policy 'lifo'; use lpm, dfs-weight or fcfs"):
        make_scheduler(cache, token_budget=10, policy="lifo")
    with pytest.raises(ValueError, match="token_budget=0 must be at least 1"):
        make_scheduler(cache, token_budget=0)


def test_backend_switch_falls_back_to_python_with_a_warning(monkeypatch):
    monkeypatch.setattr(sched, "HAVE_CORE", False)
    with pytest.warns(UserWarning, match="cai_fast._core is not built"):
        cache = make_cache(8, 2)
    assert backend_of(cache) == "python" and backend_of(make_scheduler(cache, token_budget=4)) == "python"
    with pytest.raises(ValueError, match="unknown scheduler backend 'rust'"):
        make_cache(8, 2, backend="rust")


def test_backend_of_names_the_backend(backend):
    cache = make_cache(8, 2, backend)
    assert backend_of(cache) == backend == backend_of(cache.pool) == backend_of(make_scheduler(cache, token_budget=4))
