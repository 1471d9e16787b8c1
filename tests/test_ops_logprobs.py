"""linear_logprobs / linear_option_logprobs: torch chunked path and Triton kernels (interpreted on
CPU) against a float64 unfused reference, values and every gradient."""

import pytest
import torch

import cai_fast.ops as ops
from cai_fast.ops.testing import assert_close, assert_same_outputs_and_grads, random_head

from helpers.ops import PATHS


TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (3e-2, 3e-2)}
# (N, H, V, rows per tile, Triton block over V): 13 ∤ 47, 32 ∤ 123 and 16 ∤ 123
LAYOUTS = {"odd-auto": (47, 31, 123, None, None), "odd-13rows-32cols": (47, 31, 123, 13, 32),
           "odd-64rows-16cols": (47, 31, 123, 64, 16), "realistic-auto": (96, 64, 512, None, None)}
NAMES = ["hidden", "weight", "bias"]


def _inputs(layout, dtype, with_bias):
    n_rows, size, vocab, _, _ = LAYOUTS[layout]
    fast, ref = random_head(n_rows, size, vocab, dtype=dtype)
    if not with_bias:
        fast[2] = ref[2] = None
    return fast, ref


def _ids(shape, vocab, seed=3):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature, with_bias", [(1.0, False), (0.7, True)], ids=["plain", "T=0.7+bias"])
def test_linear_logprobs_matches_reference(path, dtype, layout, temperature, with_bias):
    fast_inputs, ref_inputs = _inputs(layout, dtype, with_bias)
    n_rows, _, vocab, chunk_rows, block_size = LAYOUTS[layout]
    targets = _ids((n_rows,), vocab)

    def fast(h, w, b):
        return ops.linear_logprobs(h, w, targets, b, temperature=temperature)

    def reference(h, w, b):
        return ops.linear_logprobs_reference(h, w, targets, b, temperature=temperature)

    with ops.use_path(path, chunk_rows=chunk_rows, block_size=block_size):
        assert_same_outputs_and_grads(fast, reference, fast_inputs, ref_inputs, TOL[dtype], NAMES)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["odd-13rows-32cols", "realistic-auto"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared-options", "per-row-options"])
def test_linear_option_logprobs_matches_reference(path, dtype, layout, per_row):
    fast_inputs, ref_inputs = _inputs(layout, dtype, with_bias=True)
    n_rows, _, vocab, chunk_rows, block_size = LAYOUTS[layout]
    options = _ids((n_rows, 5) if per_row else (3,), vocab)
    options[..., -1] = options[..., 0]  # a repeated option must get its gradient twice

    def fast(h, w, b):
        return ops.linear_option_logprobs(h, w, options, b, temperature=1.3)

    def reference(h, w, b):
        return ops.linear_option_logprobs_reference(h, w, options, b, temperature=1.3)

    with ops.use_path(path, chunk_rows=chunk_rows, block_size=block_size):
        assert_same_outputs_and_grads(fast, reference, fast_inputs, ref_inputs, TOL[dtype], NAMES)


@pytest.mark.parametrize("path", PATHS)
def test_option_logprobs_over_the_whole_vocabulary_sum_to_one(path):
    (hidden, weight, bias), _ = random_head(*LAYOUTS["odd-auto"][:3])
    with ops.use_path(path, block_size=32):
        logp, lse = ops.linear_option_logprobs(hidden, weight, torch.arange(123), bias)
        targets_logp = ops.linear_logprobs(hidden, weight, torch.full((47,), 5), bias)
    assert_close("log Σ p", torch.logsumexp(logp, dim=1), torch.zeros(47), 1e-5, 0)
    assert_close("logp[5]", logp[:, 5], targets_logp, 1e-6, 0)
    assert_close("lse", lse, torch.logsumexp(hidden @ weight.T + bias, dim=1), 1e-5, 1e-6)


ZEROS = torch.zeros(47, dtype=torch.int64)


@pytest.mark.parametrize("call, message", [
    (lambda h, w: ops.linear_logprobs(h, w, ZEROS - 1), r"targets\[0\] = -1 is outside"),
    (lambda h, w: ops.linear_logprobs(h, w, ZEROS[:, None]), r"targets must be int64 of shape"),
    (lambda h, w: ops.linear_logprobs(h, w, ZEROS.int()), r"got torch.int32"),
    (lambda h, w: ops.linear_logprobs(h[None], w, ZEROS), r"hidden must have 2 dims"),
    (lambda h, w: ops.linear_logprobs(h, w, ZEROS, temperature=0.0), r"temperature must be > 0"),
    (lambda h, w: ops.linear_option_logprobs(h, w, ZEROS[1:, None].expand(46, 2)),
     r"options must be int64 of shape \(47, 2\)"),
    (lambda h, w: ops.linear_option_logprobs(h, w, torch.tensor(3)),
     r"options must be \[K\] or \[N, K\]"),
])
def test_bad_arguments_are_named(call, message):
    (hidden, weight, _), _ = random_head(*LAYOUTS["odd-auto"][:3])
    with pytest.raises(ValueError, match=message):
        call(hidden, weight)
