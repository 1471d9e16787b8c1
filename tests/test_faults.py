"""Faults injected and survived: a full disk or a read-only folder while appending records or saving a
checkpoint, and corrupted checkpoint files on resume. Each is a one-line error naming the folder or
file; nothing already written is damaged; the same command completes once the fault is gone."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import cai_fast.store as store_module
from cai_fast.cli import main
from cai_fast.store import RunFolderError, RunStore, write_atomic, write_jsonl

from helpers.processes import line_count
from helpers.rows import sft_rows


FAST = ["--rounds", "1", "--batch-size", "2", "--answer-tokens", "6", "--critique-tokens", "4",
        "--revision-tokens", "6", "--quiet"]
FAULTS = [errno.ENOSPC, errno.EROFS, errno.EDQUOT]


class _FailingWrites:
    """os.write that fails with `code` after `after` successful calls, writing half of its data
    first (what a full disk does to a large write)."""

    def __init__(self, code: int, after: int = 0):
        self.code, self.after, self.real = code, after, os.write

    def __call__(self, fd, data):
        if self.after > 0:
            self.after -= 1
            return self.real(fd, data)
        self.real(fd, bytes(data[: max(1, len(data) // 2)]))
        raise OSError(self.code, os.strerror(self.code))


def one_line(err: str, *parts: str) -> None:
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, (part, err)


@pytest.mark.parametrize("code", FAULTS, ids=errno.errorcode.get)
def test_a_failed_append_leaves_the_shard_as_it_was(tmp_path, monkeypatch, code):
    store = RunStore(tmp_path / "run", {"a": 1})
    store.append("records", [{"prompt_id": i, "text": "x" * 50} for i in range(3)])
    shard = store.shards("records")[0]
    before = shard.read_bytes()
    monkeypatch.setattr(store_module.os, "write", _FailingWrites(code))
    with pytest.raises(RunFolderError, match=f"{tmp_path / 'run'}: cannot write .*run the same command again"):
        store.append("records", [{"prompt_id": i, "text": "y" * 5000} for i in range(3, 9)])
    assert shard.read_bytes() == before  # the batch in flight is absent, not half there
    monkeypatch.undo()
    store.append("records", [{"prompt_id": 3}])
    assert [r["prompt_id"] for r in store.read("records")] == [0, 1, 2, 3]


@pytest.mark.parametrize("code", FAULTS, ids=errno.errorcode.get)
def test_a_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, code):
    path = tmp_path / "config.json"
    write_atomic(path, "old\n")

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(store_module.os, "fsync", full)
    with pytest.raises(RunFolderError, match=f"{tmp_path}: cannot write"):
        write_atomic(path, "new\n" * 1000)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_sl_cai_on_a_full_disk_stops_with_one_line_and_completes_later(tiny_model_path, tmp_path, monkeypatch,
                                                                      capsys):
    common = ["sl-cai", "--model", str(tiny_model_path), "--limit", "6", *FAST]
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    out = tmp_path / "run"
    monkeypatch.setattr(store_module.os, "write", _FailingWrites(errno.ENOSPC, after=2))  # the lock, the 1st batch; the 2nd fails
    assert main([*common, "--out", str(out)]) == 2
    one_line(capsys.readouterr().err, str(out), "No space left on device", "run the same command again")
    assert len((out / "records-00000.jsonl").read_text().splitlines()) == 2  # the first batch, whole
    monkeypatch.undo()
    assert main([*common, "--out", str(out)]) == 0  # space is back
    for name in ("records-00000.jsonl", "sft_messages/train-00000.jsonl"):
        read = lambda folder: sorted((json.loads(x) for x in (folder / name).read_text().splitlines()),  # noqa: E731
                                     key=lambda r: json.dumps(r, sort_keys=True))
        assert read(out) == read(tmp_path / "full"), name


@pytest.fixture
def interrupted_sft(tiny_model_path, tmp_path, monkeypatch, capsys):
    """An SFT run of 3 steps stopped by Ctrl-C right after its first checkpoint; its command line."""
    from cai_fast.train.common import TrainRun

    data = tmp_path / "sft.jsonl"
    write_jsonl(data, sft_rows(6, seed=1))
    args = ["train", "sft", "--model", str(tiny_model_path), "--data", str(data), "--out", str(tmp_path / "sft"),
            "--save-every", "1", "--max-steps", "3", "--quiet"]
    save = TrainRun.save_checkpoint

    def save_then_interrupt(run):
        save(run)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainRun, "save_checkpoint", save_then_interrupt)
    assert main(args) == 130
    one_line(capsys.readouterr().err, "interrupted", "run the same command again")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "sft" / "checkpoints").glob("*step-*")] == ["step-000001"]
    return args


def _corrupt_safetensors(step):
    path = step / "trainable.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _corrupt_json(step):
    path = step / "state.json"
    path.write_text(path.read_text().replace('"step"', '"stpe"'))
    return path


@pytest.mark.parametrize("corrupt", [_corrupt_safetensors, _corrupt_json], ids=["truncated-safetensors", "edited-json"])
def test_a_corrupted_checkpoint_is_refused_with_the_file_named(interrupted_sft, tmp_path, capsys, corrupt):
    step = tmp_path / "sft" / "checkpoints" / "step-000001"
    corrupt(step)
    assert main(interrupted_sft) == 2
    one_line(capsys.readouterr().err, str(step), "not a usable checkpoint", "remove it")
    assert step.exists()  # refused, not loaded half, not deleted
    shutil.rmtree(step)  # what the message says to do: the run starts over
    assert main(interrupted_sft) == 0


def test_a_checkpoint_on_a_full_disk_keeps_the_last_one(interrupted_sft, tmp_path, monkeypatch, capsys):
    import cai_fast.train.common as common

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(common, "save_file", full)
    assert main(interrupted_sft) == 2  # resumes from step 1, cannot save step 2
    root = tmp_path / "sft" / "checkpoints"
    one_line(capsys.readouterr().err, str(root), "No space left on device")
    assert sorted(p.name for p in root.glob("*step-*")) == ["step-000001"]  # no half checkpoint beside it
    monkeypatch.undo()
    assert main(interrupted_sft) == 0


def test_sigterm_during_sl_cai_stops_cleanly_and_the_rerun_is_the_uninterrupted_run(tiny_model_path, tmp_path):
    common = [sys.executable, "-m", "cai_fast.cli", "sl-cai", "--model", str(tiny_model_path), "--limit", "8", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*common, "--out", str(tmp_path / "full")], env=env, cwd=tmp_path, capture_output=True)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "run"
    proc = subprocess.Popen([*common, "--out", str(out)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while line_count(out / "records-00000.jsonl") < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "no record was written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 130
    one_line(proc.stderr.read(), "interrupted", "run the same command again")
    assert line_count(out / "records-00000.jsonl") % 2 == 0  # whole batches of 2 only
    resumed = subprocess.run([*common, "--out", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr  # the lock was let go
    read = lambda folder: sorted((folder / "records-00000.jsonl").read_text().splitlines())  # noqa: E731
    assert read(out) == read(tmp_path / "full")
