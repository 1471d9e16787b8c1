"""Run folders: the saved config, JSONL shards appended atomically, and resume.

A run writes everything to one folder: DIR/config.json (what produced the data; a different config is refused),
DIR/<kind>-00000.jsonl (records, appended in whole batches, rotated every N records) and DIR/<dataset>/...
(datasets derived from the records at the end, rewritten whole). Every record carries a stable key (e.g. the
prompt id). A batch is appended with one write() followed by fsync, so a kill leaves either the whole batch or,
at worst, a torn last line, cut off when the run resumes: re-running the same command continues where it
stopped, loses nothing and duplicates nothing. `resume_records` is that loop, once, for every stage (and
`resume_batches` its list); it holds the batch being made and 16 bytes a stored record (`_Done`: a digest of its
key and where it lies), never the stored records, which are read back one at a time in the items' order. Shards
are read line by line. A RunStore holds an exclusive lock on DIR/.lock, so a second run on the same folder is
refused (details: `RunStore`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import tempfile
from array import array
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm


class RunConfigError(ValueError):
    """The folder holds a run made with another config; the message says what differs."""


class RunFolderError(ValueError):
    """A run folder that cannot be used as it is (locked, corrupt); the message says what to do."""


LOCK_FILE = ".lock"
_HELD_LOCKS: dict[Path, int] = {}  # run folder -> open lock file descriptor, held until the process exits


class RunStore:
    """One run folder: its config (checked or saved), its lock, its JSONL records.

    `started`: whether the folder already holds data of the run (default: any entry but the
    config, the lock and temporary files); a folder with a config that has not started takes a
    new config. `lock=False` only for the other processes of a distributed run whose main
    process holds the lock.

    config.json: an input recorded by content, `KEY_sha256` beside `KEY`, is compared by that
    digest; `KEY`, the path as typed, is kept for people. The lock is fcntl.flock on DIR/.lock, for
    the life of the process; the file names the holder's pid. A corrupt config.json or records line
    is an error naming the file and line, and nothing is overwritten. Files written by
    `write_atomic` get the umask's mode.
    """

    def __init__(self, root: str | Path, config: dict, *, shard_size: int = 1000,
                 started: bool | None = None, lock: bool = True):
        self.root, self.shard_size = Path(root), shard_size
        self._tails: dict[str, tuple[Path, int, int, int]] = {}  # kind -> last shard, its lines, its size, shards
        self.root.mkdir(parents=True, exist_ok=True)
        if lock:
            lock_run_folder(self.root)
        self._check_or_save_config(config, self._has_records() if started is None else started)

    def _check_or_save_config(self, config: dict, started: bool) -> None:
        path = self.root / "config.json"
        config = json.loads(json.dumps(config))  # normalise tuples, paths
        saved = read_json(path, "the run's config") if path.exists() else None
        if saved is None or not started:
            if saved != config:
                write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
            return
        if not isinstance(saved, dict):
            raise RunFolderError(f"{path}: the run's config is not a JSON object; restore it or remove the folder")
        diffs = [f"{k}: {saved.get(k)!r} in the run, {config.get(k)!r} now"
                 for k in sorted(set(saved) | set(config))
                 if saved.get(k) != config.get(k) and f"{k}_sha256" not in config]
        if diffs:
            raise RunConfigError(
                f"{self.root} holds a run made with another config ({'; '.join(diffs)}). "
                "Re-run with the same options to resume it, or choose a new output folder."
            )

    def _has_records(self) -> bool:
        """Whether the folder holds anything but its config, lock and temporary files."""
        return any(p.name != "config.json" and not p.name.startswith(".") for p in self.root.iterdir())

    def shards(self, kind: str) -> list[Path]:
        return sorted(self.root.glob(f"{kind}-[0-9][0-9][0-9][0-9][0-9].jsonl"))

    def read(self, kind: str) -> list[dict]:
        """All complete records of one kind, in the order they were written."""
        return [record for _, _, record in self.records(kind)]

    def records(self, kind: str) -> Iterator[tuple[int, int, dict]]:
        """(shard number, byte offset, record) for every complete record of one kind, in the order they were
        written, read as they are needed."""
        for index, shard in enumerate(self.shards(kind)):
            for number, offset, line in _complete_lines(shard):
                yield index, offset, _parse_record(shard, number, line)

    def keys(self, kind: str, key: str) -> set:
        return {record[key] for _, _, record in self.records(kind)}

    def append(self, kind: str, records: Iterable[dict]) -> None:
        """Append records in one atomic write; start a new shard when the last one is full."""
        records = list(records)
        if not records:
            return
        shard, lines, shards = self._open_shard(kind)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        fd = os.open(shard, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as err:  # disk full, read-only, Ctrl-C, SIGTERM: the batch is cut off whole
            os.ftruncate(fd, size)
            if isinstance(err, OSError):
                raise RunFolderError(unwritable(self.root, err)) from None
            raise
        finally:
            os.close(fd)
        self._tails[kind] = (shard, lines + len(records), size + len(data), shards)

    def _open_shard(self, kind: str) -> tuple[Path, int, int]:
        """(the shard to append to, its lines, how many shards there are with it). The last shard's lines are
        counted (and a torn last line cut off) once, then carried on while its size is the one this store left."""
        tail = self._tails.get(kind)
        if tail is None or not tail[0].exists() or tail[0].stat().st_size != tail[2]:
            tail = self._find_tail(kind)
        shard, lines, _, shards = tail
        if lines < self.shard_size:
            return shard, lines, shards
        return self.root / f"{kind}-{shards:05d}.jsonl", 0, shards + 1

    def _find_tail(self, kind: str) -> tuple[Path, int, int, int]:
        shards = self.shards(kind)
        if not shards:
            return self.root / f"{kind}-00000.jsonl", 0, 0, 1
        lines, end = 0, 0
        for lines, offset, line in _complete_lines(shards[-1]):
            end = offset + len(line)
        if end < shards[-1].stat().st_size:
            os.truncate(shards[-1], end)
        return shards[-1], lines, end, len(shards)


def resume_records(store: RunStore | None, kind: str, items: Sequence, work: Callable[[list], list[dict]], *,
                   batch_size: int, key: str = "prompt_id", item_key: Callable = lambda x: x.id,
                   desc: str = "", unit: str = "prompt", progress: bool = True) -> Iterator[tuple[dict, bool]]:
    """(the record of each item, whether it came from an earlier run), in the items' order, as they come.

    Records of `kind` already in `store` (matched by record[key] == item_key(item); the last one of
    a key wins) are read back, not redone; the other items go to `work(batch)` -> one record per
    item, `batch_size` at a time in the items' order, each batch appended to the store as soon as
    it is made. Without a store nothing is saved. Held: the items since the first of the batch
    being made, that batch's records, and 16 bytes a stored record (`_Done`).
    """
    done = _Done(store, kind, key)
    initial = sum(done.holds(item_key(x)) for x in items) if progress else 0
    pending, todo = [], []  # pending: (item, made now), from the first item of the batch being made on

    def made() -> Iterator[tuple[dict, bool]]:
        records = work(todo)
        if store:
            store.append(kind, records)
        bar.update(len(records))
        new = {r[key]: r for r in records}
        for item, now in pending:
            yield (new[item_key(item)], False) if now else (done.get(item_key(item)), True)

    with done, tqdm(total=len(items), initial=initial, desc=desc or kind, unit=unit, disable=not progress) as bar:
        for item in items:
            record = done.get(item_key(item))
            if record is not None and not todo:
                yield record, True
                continue
            pending.append((item, record is None))
            todo += [item] if record is None else []
            if len(todo) == batch_size:
                yield from made()
                pending, todo = [], []
        if pending:
            yield from made()


def resume_batches(store: RunStore | None, kind: str, items: Sequence, work: Callable[[list], list[dict]],
                   **options) -> tuple[list[dict], int]:
    """(the record of every item, in the items' order; how many came from an earlier run): `resume_records`
    gathered into a list, for the stages that use every record at the end."""
    records, resumed = [], 0
    for record, earlier in resume_records(store, kind, items, work, **options):
        records.append(record)
        resumed += earlier
    return records, resumed


class _Done:
    """The stored records of one kind, by key, in 16 bytes each: 8-byte digests of the keys, sorted, beside
    where the last record of each lies (shard number << 40 | byte offset). `get` reads a record back and
    checks its key, so two keys of one digest cost a redone item, never a wrong record."""

    def __init__(self, store: RunStore | None, kind: str, key: str):
        self._key, self._shards, self._file = key, [], None
        self._digests, self._places = np.empty(0, np.uint64), np.empty(0, np.int64)
        if store is None:
            return
        digests, places = array("Q"), array("q")
        for index, offset, record in store.records(kind):
            digests.append(_key_digest(record[key]))
            places.append(index << 40 | offset)
        self._shards = store.shards(kind)
        if digests:
            digests, places = np.frombuffer(digests, np.uint64), np.frombuffer(places, np.int64)
            order = np.argsort(digests, kind="stable")
            self._digests, self._places = digests[order], places[order]
            last = np.append(self._digests[1:] != self._digests[:-1], True)  # of each digest, its last record
            self._digests, self._places = self._digests[last], self._places[last]

    def _place(self, value) -> int | None:
        digest = np.uint64(_key_digest(value))
        at = int(self._digests.searchsorted(digest))
        return int(self._places[at]) if at < len(self._digests) and self._digests[at] == digest else None

    def holds(self, value) -> bool:
        return self._place(value) is not None

    def get(self, value) -> dict | None:
        """The stored record whose key is `value`, read back, or None."""
        place = self._place(value)
        if place is None:
            return None
        index, offset = place >> 40, place & ((1 << 40) - 1)
        if self._file is None or self._file[0] != index:
            self.close()
            self._file = index, open(self._shards[index], "rb")
        self._file[1].seek(offset)
        record = _parse_record(self._shards[index], f"byte {offset}", self._file[1].readline())
        return record if record.get(self._key) == value else None

    def close(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None

    def __enter__(self) -> "_Done":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key_digest(value) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(value).encode(), digest_size=8).digest(), "little")


def lock_run_folder(root: Path) -> None:
    """Take the folder's exclusive lock for the rest of the process (once per folder), or raise
    RunFolderError naming the process that holds it."""
    root = root.resolve()
    held = _HELD_LOCKS.pop(root, None)
    if held is not None:
        if (root / LOCK_FILE).exists() and os.path.samestat(os.fstat(held), (root / LOCK_FILE).stat()):
            _HELD_LOCKS[root] = held
            return
        os.close(held)  # the folder was removed and made again: lock the new one
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunFolderError(f"{root} is in use by another cai-fast run (pid {holder}); wait for it to finish "
                             "or stop it, or choose another output folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[root] = fd


def read_json(path: Path, what: str):
    """The JSON content of a file the run wrote, or RunFolderError naming it and saying what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{path}: {what} is corrupt ({err}); restore or repair it, or remove it "
                             "(and what depends on it) to start over") from None


def _parse_record(path: Path, where: int | str, line: bytes) -> dict:
    """The record on one line of a shard (`where`: its number), or RunFolderError naming the file and line."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        record = "not UTF-8"
    except json.JSONDecodeError as err:
        record = err
    if not isinstance(record, dict):
        raise RunFolderError(f"{path}:{where}: corrupt record ({record}); move the file away or delete that "
                             "line (the record is then made again), then re-run")
    return record


def _complete_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line) for each line of a shard that was fully written (a torn last line, with
    no newline, is left out), read as they are needed."""
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            yield number, offset, line
            offset += len(line)


def content_sha256(value) -> str:
    """A digest of JSON-able content (dataclasses as their fields): what a run config records of
    its inputs, so that the same content under another path resumes the run."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=_plain)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def unwritable(folder: Path, err: OSError) -> str:
    """The one line for a folder the run cannot write to (ENOSPC, EROFS, EACCES, EDQUOT ...)."""
    return (f"{folder}: cannot write ({err.strerror or err}); what was written before is intact: free space "
            "or make the folder writable, then run the same command again")


def write_atomic(path: Path, text: str | Iterable[str]) -> None:
    """Write a file so that readers see the old content or the new, never half of it; `text` is a
    string or pieces of one, written as they come. Its mode is what the umask gives a new file
    (0o666 & ~umask). A failed write (disk full, read-only folder) leaves the old file and no
    temporary one, and is a RunFolderError naming the folder; so does any error while the pieces
    are made, which is raised as it is."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines([text] if isinstance(text, str) else text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise RunFolderError(unwritable(path.parent, err)) from None
        raise


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """The records as JSONL, written atomically line by line (records may be a stream)."""
    write_atomic(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))
