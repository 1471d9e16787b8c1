"""Path switching of cai_fast.ops, import without triton, and the memory contract: no tensor of
[N, V] logits is ever created by the chunked paths (forward or backward)."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cai_fast.ops as ops
from cai_fast.ops import _dispatch
from cai_fast.ops.testing import random_head

from helpers.ops import NO_TRITON, PATHS


def test_use_path_nests_and_restores():
    before = ops.current_settings()
    with ops.use_path("torch", chunk_rows=8):
        with ops.use_path("triton", block_size=32) as inner:
            assert (inner.path, inner.chunk_rows, inner.block_size) == ("triton", None, 32)
        assert (ops.current_settings().path, ops.current_settings().chunk_rows) == ("torch", 8)
    assert ops.current_settings() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(path="cuda"), r"path must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    (dict(path="torch", chunk_rows=0), r"chunk_rows must be a positive int or None, got 0"),
    (dict(path="torch", block_size=48), r"block_size must be a power of two, got 48"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.set_default_path(**kwargs)


def test_auto_takes_torch_on_cpu_and_torch_is_never_triton():
    cpu = torch.ones(2)
    with ops.use_path("auto"):
        assert not _dispatch.takes_triton(cpu, None)
    with ops.use_path("torch"):
        assert not _dispatch.takes_triton(cpu)


def _run_python(code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_changes
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


def test_import_and_ops_work_without_triton():
    code = """if True:
        import sys; sys.modules["triton"] = None  # as if triton were not installed
        import torch, cai_fast.ops as ops
        assert not ops.HAS_TRITON
        h, w = torch.randn(5, 8), torch.randn(11, 8)
        print(float(ops.fused_linear_cross_entropy(h, w, torch.arange(5))))
        with ops.use_path("triton"):
            ops.linear_logprobs(h, w, torch.arange(5))
    """
    result = _run_python(code)
    assert "path 'triton' was forced but triton is not installed" in result.stderr, result.stderr
    assert result.stdout.strip(), "the torch path should have run first"


@pytest.mark.skipif(bool(NO_TRITON), reason=NO_TRITON)
def test_forcing_triton_on_cpu_without_the_interpreter_says_what_to_do():
    code = """if True:
        import torch, cai_fast.ops as ops
        with ops.use_path("triton"):
            ops.linear_logprobs(torch.randn(5, 8), torch.randn(11, 8), torch.arange(5))
    """
    assert "set TRITON_INTERPRET=1" in _run_python(code).stderr


@pytest.mark.skipif(bool(NO_TRITON), reason=NO_TRITON)
def test_interpreter_asked_for_after_triton_was_imported_says_what_to_do():
    code = """if True:
        import os, torch, triton.language, cai_fast.ops as ops
        os.environ["TRITON_INTERPRET"] = "1"
        with ops.use_path("triton"):
            ops.linear_logprobs(torch.randn(5, 8), torch.randn(11, 8), torch.arange(5))
    """
    stderr = _run_python(code).stderr
    assert "set TRITON_INTERPRET=1 in the environment before Python starts" in stderr, stderr


class _LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any aten op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ["cross_entropy_mean", "cross_entropy_none", "logprobs"])
def test_no_tensor_of_all_logits_is_ever_made(path, op):
    n_rows, size, vocab = 256, 16, 300
    (hidden, weight, bias), _ = random_head(n_rows, size, vocab)
    hidden.requires_grad_(True), weight.requires_grad_(True)
    targets = torch.randint(0, vocab, (n_rows,), generator=torch.Generator().manual_seed(0))
    call = {"cross_entropy_mean": lambda: ops.fused_linear_cross_entropy(hidden, weight, targets, bias),
            "cross_entropy_none": lambda: ops.fused_linear_cross_entropy(
                hidden, weight, targets, bias, reduction="none").sum(),
            "logprobs": lambda: ops.linear_logprobs(hidden, weight, targets, bias).sum()}[op]
    with ops.use_path(path, chunk_rows=32), _LargestTensor() as watch:
        call().backward()
    tile_bytes = 32 * vocab * 4  # one fp32 tile of 32 rows; all the logits would be 8 times that
    assert watch.largest <= tile_bytes, f"a tensor of {watch.largest} bytes was made"


@pytest.mark.parametrize("path", PATHS)
def test_every_op_takes_zero_rows(path):
    """A batch filtered down to nothing (e.g. every example too long) gives empty outputs, a zero
    summed loss and zero gradients, never an error from a chunk size of 0."""
    (hidden, weight, bias), _ = random_head(0, 8, 11)
    hidden.requires_grad_(True), weight.requires_grad_(True)
    none = torch.zeros(0, dtype=torch.long)
    with ops.use_path(path):
        assert ops.linear_logprobs(hidden, weight, none, bias).shape == (0,)
        logp, lse = ops.linear_option_logprobs(hidden, weight, torch.tensor([3, 5]), bias)
        assert logp.shape == (0, 2) and lse.shape == (0,)
        assert ops.fused_linear_cross_entropy(hidden, weight, none, bias, reduction="none").shape == (0,)
        loss = ops.fused_linear_cross_entropy(hidden, weight, none, bias, reduction="sum")
        loss.backward()
        assert loss.detach().item() == 0 and hidden.grad.shape == (0, 8) and not weight.grad.any()
        scores = ops.swapped_pair_scores(torch.randn(0, 2, 2, 8), weight.detach(), (3, 5))
        assert all(t.shape[0] == 0 for t in scores)
        loss, r_chosen, _ = ops.reward_bt_loss(torch.randn(0, 8), torch.randn(0, 8), torch.randn(8), None,
                                               torch.zeros(0), reduction="sum")
        assert loss.item() == 0 and r_chosen.shape == (0,)
