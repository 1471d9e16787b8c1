"""The run store: config guard, atomic appends, torn-line repair, shard rotation."""

import contextlib
import json
import os
import random
import stat
import subprocess
import sys

import pytest

from cai_fast.store import (RunConfigError, RunFolderError, RunStore, resume_batches, resume_records, write_atomic,
                            write_jsonl)


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
    RunStore(tmp_path, {"rounds": 2, "seed": 0, "model": "m"}).append("records", _records(1, 0))
    RunStore(tmp_path, {"rounds": 2, "seed": 0, "model": "m"})  # the same config resumes
    with pytest.raises(RunConfigError) as err:
        RunStore(tmp_path, {"rounds": 3, "seed": 0, "model": "m", "limit": 5})
    message = str(err.value)
    assert "rounds: 2 in the run, 3 now" in message and "limit: None in the run, 5 now" in message
    assert str(tmp_path) in message and "new output folder" in message


class _Item:
    def __init__(self, id):
        self.id = id


def _made(batches):
    """A work function that records the batches it was given and makes one record per item."""
    def work(batch):
        batches.append([x.id for x in batch])
        return [{"prompt_id": x.id, "value": f"{x.id}:{len(batches)}"} for x in batch]
    return work


def test_resume_batches_makes_only_what_is_missing_and_keeps_the_items_order(tmp_path):
    rng = random.Random(3)
    items = [_Item(f"p{i}") for i in rng.sample(range(100), 11)]
    store = RunStore(tmp_path, {"a": 1})
    first = []
    records, resumed = resume_batches(store, "recs", items[:7], _made(first), batch_size=3, progress=False)
    assert resumed == 0 and first == [[x.id for x in items[:7][i : i + 3]] for i in (0, 3, 6)]
    again = []
    records2, resumed2 = resume_batches(store, "recs", items, _made(again), batch_size=3, progress=False)
    assert resumed2 == 7 and again == [[x.id for x in items[7:10]], [items[10].id]]
    assert [r["prompt_id"] for r in records2] == [x.id for x in items] and records2[:7] == records


def test_resume_batches_keeps_one_record_per_key_and_works_without_a_store(tmp_path):
    store = RunStore(tmp_path, {"a": 1})
    items = [_Item("x"), _Item("y")]
    store.append("recs", [{"prompt_id": "x", "value": "old"}, {"prompt_id": "x", "value": "new"}])
    records, resumed = resume_batches(store, "recs", items, _made([]), batch_size=4, progress=False)
    assert resumed == 1 and [r["value"] for r in records] == ["new", "y:1"]
    records, resumed = resume_batches(None, "recs", items, _made([]), batch_size=1, progress=False)
    assert resumed == 0 and [r["value"] for r in records] == ["x:1", "y:2"]


def test_a_folder_with_a_config_and_no_records_takes_the_new_config(tmp_path):
    RunStore(tmp_path, {"temperature": -1})  # a run that a later check refused
    RunStore(tmp_path, {"temperature": 0.7}).append("records", _records(1, 0))
    assert json.loads((tmp_path / "config.json").read_text()) == {"temperature": 0.7}
    with pytest.raises(RunConfigError):
        RunStore(tmp_path, {"temperature": 0.5})


def test_a_corrupt_config_is_named_and_never_overwritten(tmp_path):
    (tmp_path / "config.json").write_text('{"rounds": 2,')
    with pytest.raises(RunFolderError, match=r"config\.json: the run's config is corrupt .*restore"):
        RunStore(tmp_path, {"rounds": 2})
    assert (tmp_path / "config.json").read_text() == '{"rounds": 2,'


@pytest.mark.parametrize("bad", [b'{"prompt_id": "x", "te\n', b"[1, 2]\n", b'{"prompt_id": "\xff"}\n'])
def test_a_corrupt_line_that_ends_in_a_newline_is_named_by_file_and_line(tmp_path, bad):
    store = RunStore(tmp_path, {"a": 1})
    store.append("records", _records(2, 3))
    shard = store.shards("records")[0]
    with open(shard, "ab") as f:
        f.write(bad)
    before = shard.read_bytes()
    with pytest.raises(RunFolderError, match=rf"{shard}:3: corrupt record .*delete that line"):
        store.read("records")
    with pytest.raises(RunFolderError):
        resume_batches(store, "records", [_Item("new")], _made([]), batch_size=1, progress=False)
    assert shard.read_bytes() == before


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode


def test_a_folder_locked_by_another_process_is_refused_naming_it(tmp_path):
    code = ("import sys; from cai_fast.store import RunStore; "
            f"RunStore({str(tmp_path)!r}, {{'a': 1}}); print('ready', flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(RunFolderError, match=rf"in use by another cai-fast run \(pid {holder.pid}\)"):
            RunStore(tmp_path, {"a": 1})
    finally:
        holder.communicate("\n", timeout=60)
    RunStore(tmp_path, {"a": 1}).append("records", _records(1, 0))  # free once the holder has exited
    RunStore(tmp_path, {"a": 1})  # this process holds it now: taking it again is a no-op


def _reference_resume(store, kind, items, work, batch_size):
    """The whole-read resume that resume_records streams: every stored record in a dict, the rest made in batches."""
    done = {r["prompt_id"]: r for r in store.read(kind)}
    todo = [x for x in items if x.id not in done]
    for i in range(0, len(todo), batch_size):
        records = work(todo[i : i + batch_size])
        store.append(kind, records)
        done.update((r["prompt_id"], r) for r in records)
    return [done[x.id] for x in items], len(items) - len(todo)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("seed", range(8))
def test_streamed_resume_equals_the_whole_read_resume(tmp_path, seed):
    rng = random.Random(seed)
    items = [_Item(f"p{i}") for i in rng.sample(range(1000), rng.randint(5, 40))]
    batch_size, shard_size = rng.randint(1, 6), rng.randint(2, 9)
    texts = ["plain", "line\u2028separator", "next\x85line", "é✓"]

    def work(batch, log, kill_after=None):
        if kill_after is not None and len(log) == kill_after:
            raise _Killed  # the run is killed before this batch is written
        log.append([x.id for x in batch])
        return [{"prompt_id": x.id, "text": f"{rng.choice(texts)} {x.id} {len(log)}"} for x in batch]

    def earlier_run(root):  # part of the items (holes and all, a key twice), then killed, a line torn
        store = RunStore(root, {"a": 1}, shard_size=shard_size)
        store.append("recs", [{"prompt_id": x.id, "text": "stale"} for x in rng.sample(items, len(items) // 4)])
        log, kill_after = [], rng.randint(0, 3)
        with contextlib.suppress(_Killed):  # killed unless it has fewer batches
            resume_batches(store, "recs", items, lambda b: work(b, log, kill_after), batch_size=batch_size,
                           progress=False)
        with open(store.shards("recs")[-1], "a", encoding="utf-8") as f:
            f.write('{"prompt_id": "torn", "te')
        return store

    state = rng.getstate()
    expected_store = earlier_run(tmp_path / "whole")
    made_whole = []
    expected = _reference_resume(expected_store, "recs", items, lambda b: work(b, made_whole), batch_size)
    rng.setstate(state)
    store = earlier_run(tmp_path / "stream")
    made = []
    got = resume_batches(store, "recs", items, lambda b: work(b, made), batch_size=batch_size, progress=False)
    assert got == expected and made == made_whole
    assert store.read("recs") == expected_store.read("recs")
    again, resumed = resume_batches(store, "recs", items, lambda b: work(b, []), batch_size=batch_size,
                                    progress=False)
    assert (again, resumed) == (expected[0], len(items))


def test_resume_records_come_as_they_are_made(tmp_path):
    store = RunStore(tmp_path, {"a": 1})
    items = [_Item(f"p{i}") for i in range(10)]
    store.append("recs", [{"prompt_id": "p0", "value": "stored"}])
    batches = []
    stream = resume_records(store, "recs", items, _made(batches), batch_size=3, progress=False)
    assert next(stream) == ({"prompt_id": "p0", "value": "stored"}, True) and batches == []
    assert next(stream) == ({"prompt_id": "p1", "value": "p1:1"}, False) and batches == [["p1", "p2", "p3"]]
    assert [record["prompt_id"] for record, _ in stream] == [f"p{i}" for i in range(2, 10)]


def test_records_with_unicode_line_separators_read_back(tmp_path):
    store = RunStore(tmp_path, {"a": 1})
    records = [{"prompt_id": "x", "text": "a\u2028b\u2029c\x85d\x0be\x1cf"}]
    store.append("records", records)
    assert store.read("records") == records
    assert resume_batches(store, "records", [_Item("x")], _made([]), batch_size=1, progress=False) == (records, 1)


def test_a_stream_that_fails_while_written_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, _records(3, 0))
    before = path.read_bytes()

    def rows():
        yield from _records(2, 1)
        raise _Killed

    with pytest.raises(_Killed):
        write_jsonl(path, rows())
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
