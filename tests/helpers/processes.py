"""Watching and killing the subprocesses of the kill-and-resume tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

# what a stopped process exits with: SIGKILL leaves no say, SIGTERM unwinds as Ctrl-C (cai_fast.cli: 130)
EXIT = {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 130}
STOPS = [pytest.param(signal.SIGKILL, id="sigkill"), pytest.param(signal.SIGTERM, id="sigterm")]


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 240.0,
              stop: signal.Signals = signal.SIGKILL) -> None:
    """Send `stop` to `process` as soon as ready() holds (polled every 20 ms): the kill-and-resume
    tests. Fails if the process ends first, ready() does not hold within `timeout` seconds, or the
    process does not exit as `stop` should make it (EXIT)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.02)
    process.send_signal(stop)
    code = process.wait(timeout=120)
    if code != EXIT[stop]:  # what the process printed says why (a traceback, a library's own message)
        output = process.stdout.read() if process.stdout else ""
        raise AssertionError(f"{stop.name} at {what}: exit code {code}, not {EXIT[stop]}; it printed:\n"
                             f"{(output or '')[-4000:]}")


def kill_tree(pid: int, stop: signal.Signals = signal.SIGKILL) -> None:
    """Send `stop` to process `pid` and all its descendants (Linux /proc): torchrun starts its workers in
    sessions of their own, which a signal to its process group does not reach."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, i = [pid], 0
    while i < len(tree):
        tree += children.get(tree[i], [])
        i += 1
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, stop)


def line_count(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0
