"""Tree and scheduler operations, C++ (`cai_fast._core`) vs the pure-Python twin.

Workload: 32 prompts sharing a 600-token few-shot prefix, each with 3 follow-ups extending the
previous turn (128 sequences of 700-1000 tokens), as the SL-CAI critique/revision chain makes.
Run: python -m pytest benches/bench_scheduler.py --benchmark-enable
The medians, the Python/C++ ratio and the scheduler time per batch are printed at the end.
"""

from __future__ import annotations

import random

import pytest

from cai_fast.scheduler import HAVE_CORE, make_cache, make_scheduler

BACKENDS = ["cpp", "python"] if HAVE_CORE else ["python"]
POOL_TOKENS = 200_000
MEDIANS: dict[tuple[str, str], float] = {}  # (operation, backend) -> median seconds
BATCHES: dict[str, int] = {}  # schedule operation -> batches it made


def conversations(seed: int = 0) -> list[list[list[int]]]:
    """32 chains of 4 token sequences, each turn extending the one before it."""
    rng = random.Random(seed)
    few_shot = [rng.randrange(49152) for _ in range(600)]
    chains = []
    for _ in range(32):
        turns = [few_shot + [rng.randrange(49152) for _ in range(rng.randrange(60, 140))]]
        for _ in range(3):
            turns.append(turns[-1] + [rng.randrange(49152) for _ in range(rng.randrange(40, 100))])
        chains.append(turns)
    return chains


CHAINS = conversations()
SEQUENCES = [turn for chain in CHAINS for turn in chain]


def insert_all(cache):
    for tokens in SEQUENCES:
        blocks = cache.pool.alloc(len(tokens) // cache.block_size)
        already = cache.insert(tokens, blocks)
        cache.pool.free(blocks[: already // cache.block_size])
    return cache


def evict_in_steps(cache):
    while cache.evict(16 * cache.block_size):
        pass


def serve_workload(scheduler):
    """Turn k of every chain joins once turn k-1 is done; each request generates 64 tokens and
    finishes (63 of them computed). Returns the number of batches."""
    batches = 0
    for turn in range(4):
        prompts = {turn * 32 + c: chain[turn] for c, chain in enumerate(CHAINS)}
        for request_id, prompt in prompts.items():
            scheduler.add(request_id, prompt, max_new_tokens=64)
        while scheduler.num_waiting:
            batches += 1
            for request in scheduler.schedule().scheduled:
                scheduler.finish(request.request_id, prompts[request.request_id] + [7] * 63)
    return batches


def record(benchmark, op, backend):
    if benchmark.stats is not None:  # None under --benchmark-disable
        MEDIANS[(op, backend)] = benchmark.stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def print_ratios(request):
    yield
    lines = ["", "scheduler bench: median time, C++ vs Python twin"]
    for op in sorted({op for op, _ in MEDIANS}):
        cpp, python = MEDIANS.get((op, "cpp")), MEDIANS.get((op, "python"))
        if cpp and python:
            per_batch = ""
            if op in BATCHES:
                per_batch = f"   cpp per batch {cpp / BATCHES[op] * 1e6:7.1f} us ({BATCHES[op]} batches)"
            lines.append(f"  {op:<32} cpp {cpp * 1e3:8.2f} ms   python {python * 1e3:8.2f} ms"
                         f"   python/cpp {python / cpp:5.1f}x{per_batch}")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n".join(lines))


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_insert(benchmark, backend, block_size):
    def setup():
        return (make_cache(POOL_TOKENS // block_size, block_size, backend),), {}

    benchmark.pedantic(insert_all, setup=setup, rounds=5, iterations=1)
    record(benchmark, f"insert x128 bs={block_size}", backend)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_match_prefix(benchmark, backend, block_size):
    cache = insert_all(make_cache(POOL_TOKENS // block_size, block_size, backend))
    lengths = benchmark.pedantic(lambda: [cache.match_prefix(s).length for s in SEQUENCES], rounds=10, iterations=1)
    assert lengths == [len(s) // block_size * block_size for s in SEQUENCES]
    record(benchmark, f"match_prefix x128 bs={block_size}", backend)


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_evict(benchmark, backend, block_size):
    def setup():
        return (insert_all(make_cache(POOL_TOKENS // block_size, block_size, backend)),), {}

    benchmark.pedantic(evict_in_steps, setup=setup, rounds=5, iterations=1)
    record(benchmark, f"evict all, 16 blocks/call bs={block_size}", backend)


@pytest.mark.parametrize("pool_tokens", [POOL_TOKENS, 8192], ids=["roomy", "tight"])
@pytest.mark.parametrize("policy", ["lpm", "dfs-weight", "fcfs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule(benchmark, backend, policy, pool_tokens):
    """The whole workload through the scheduler (bs=16); the tight pool forces eviction."""
    def setup():
        return (make_scheduler(make_cache(pool_tokens // 16, 16, backend), 8192, policy),), {}

    op = f"schedule {policy} {'roomy' if pool_tokens == POOL_TOKENS else 'tight'} pool"
    BATCHES[op] = benchmark.pedantic(serve_workload, setup=setup, rounds=5, iterations=1)
    record(benchmark, op, backend)
