"""Watching and killing the subprocesses of the kill-and-resume tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

def kill_when(process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 240.0) -> None:
    """SIGKILL `process` as soon as ready() holds (polled every 20 ms): the kill-and-resume tests.
    Fails if the process ends first or ready() does not hold within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def line_count(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0
