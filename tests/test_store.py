"""The run store: config guard, atomic appends, torn-line repair, shard rotation."""

import json
import random

import pytest

from cai_fast.store import RunConfigError, RunStore


def _records(n, seed):
    rng = random.Random(seed)
    return [{"prompt_id": f"p{seed}-{i}", "text": "".join(rng.choice("abcé✓ ") for _ in range(rng.randint(1, 40)))}
            for i in range(n)]


def test_append_and_read_round_trip_with_rotation(tmp_path):
    store = RunStore(tmp_path, {"rounds": 2}, shard_size=5)
    batches = [_records(3, s) for s in range(4)]
    for batch in batches:
        store.append("records", batch)
    assert store.read("records") == [r for b in batches for r in b]
    # A batch is never split: shard 0 takes batches 1-2 (6 >= 5 records), shard 1 batches 3-4.
    assert [len(s.read_text().splitlines()) for s in store.shards("records")] == [6, 6]
    assert store.keys("records", "prompt_id") == {r["prompt_id"] for b in batches for r in b}


def test_torn_last_line_is_ignored_then_cut_on_the_next_append(tmp_path):
    store = RunStore(tmp_path, {"a": 1})
    first = _records(2, 1)
    store.append("records", first)
    shard = store.shards("records")[0]
    with open(shard, "a") as f:
        f.write('{"prompt_id": "torn", "te')  # a kill in the middle of a write
    assert store.read("records") == first
    second = _records(2, 2)
    store.append("records", second)
    assert store.read("records") == first + second
    assert all(json.loads(line) for line in shard.read_text().splitlines())


def test_a_different_config_is_refused_with_what_differs(tmp_path):
    RunStore(tmp_path, {"rounds": 2, "seed": 0, "model": "m"})
    RunStore(tmp_path, {"rounds": 2, "seed": 0, "model": "m"})  # the same config resumes
    with pytest.raises(RunConfigError) as err:
        RunStore(tmp_path, {"rounds": 3, "seed": 0, "model": "m", "limit": 5})
    message = str(err.value)
    assert "rounds: 2 in the run, 3 now" in message and "limit: None in the run, 5 now" in message
    assert str(tmp_path) in message and "new output folder" in message
