"""Which implementation an op runs: the Triton kernels or the chunked torch path.

"auto" (the default) takes Triton when the tensors are on CUDA and triton is installed, else the chunked torch
path. "torch" forces the chunked torch path. "triton" forces the kernels; on CPU tensors that works only under
`TRITON_INTERPRET=1` (how the tests run the kernels without a GPU), which Triton reads once, when
`triton.language` is first imported (torch imports it too, e.g. for `torch.nn.attention`), so it must be set
before that; a CPU op that finds triton imported without it says so. Triton is never imported here: the kernel
modules (`cai_fast.ops.kernels.*`) are imported on the first call that takes the Triton path, and
`import cai_fast.ops` works where triton is missing (`HAS_TRITON` is False).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
PATHS = ("auto", "triton", "torch")


@dataclasses.dataclass
class OpsSettings:
    """How the ops run. chunk_rows / block_size of None let each op choose (tests set them)."""

    path: str = "auto"
    chunk_rows: int | None = None  # rows of h·Wᵀ computed at once by the vocabulary ops
    block_size: int | None = None  # inner block of the Triton kernels (over V or H)


_settings = OpsSettings()


def current_settings() -> OpsSettings:
    return _settings


def _checked(path: str, chunk_rows: int | None, block_size: int | None) -> OpsSettings:
    if path not in PATHS:
        raise ValueError(f"cai_fast.ops: path must be one of {PATHS}, got {path!r}")
    for name, value in (("chunk_rows", chunk_rows), ("block_size", block_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"cai_fast.ops: {name} must be a positive int or None, got {value!r}")
    if block_size is not None and block_size & (block_size - 1):
        raise ValueError(f"cai_fast.ops: block_size must be a power of two, got {block_size}")
    return OpsSettings(path, chunk_rows, block_size)


def set_default_path(path: str, *, chunk_rows: int | None = None, block_size: int | None = None) -> None:
    """Set the module-wide default: path "auto" | "triton" | "torch", and optional chunk sizes."""
    global _settings
    _settings = _checked(path, chunk_rows, block_size)


@contextlib.contextmanager
def use_path(path: str, *, chunk_rows: int | None = None, block_size: int | None = None):
    """Run the ops inside the `with` block on `path` (and chunk sizes, if given)."""
    global _settings
    previous, _settings = _settings, _checked(path, chunk_rows, block_size)
    try:
        yield _settings
    finally:
        _settings = previous


def takes_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the current settings send an op on these tensors to the Triton kernels."""
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if _settings.path == "torch" or (_settings.path == "auto" and not (on_cuda and HAS_TRITON)):
        return False
    if not HAS_TRITON:
        raise RuntimeError("cai_fast.ops: path 'triton' was forced but triton is not installed; "
                           "install triton or use path 'torch'")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("cai_fast.ops: path 'triton' was forced on CPU tensors; move them to "
                           "CUDA, or set TRITON_INTERPRET=1 before the first op to interpret the "
                           "kernels on CPU")
    if not on_cuda and not _triton_is_interpreted():
        raise RuntimeError("cai_fast.ops: TRITON_INTERPRET=1 was set after triton had been imported "
                           "(torch and transformers import it too), so its kernels cannot be "
                           "interpreted; set TRITON_INTERPRET=1 in the environment before Python starts")
    return True


def _triton_is_interpreted() -> bool:
    """True when triton.language was imported under TRITON_INTERPRET=1 (its own jit functions are
    then interpreted too; otherwise every kernel fails on its first `tl.zeros`)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def block_for(n: int, cap: int) -> int:
    """Inner block of a Triton kernel over a dimension of size n: the forced one, else
    min(cap, next_power_of_2(n)), at least 16."""
    return _settings.block_size or max(16, min(cap, next_power_of_2(n)))
