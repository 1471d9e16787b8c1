"""invariant_linear (cai_fast.ops.invariant): each row of a product is the same bits alone, in a
call of a few rows and in a call of many, wherever it lies, in fp32 and bf16, with and without a
bias, on shapes of the default model's projections and odd ones; and equal to F.linear up to
rounding. On a CPU with AMX tiles torch's own fp32 and bf16 kernels fail the first part. Under
autograd a large call is F.linear's whole and gradients flow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cai_fast.engine.model_runner import FusedLinear
from cai_fast.ops.invariant import invariant_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,k", [(576, 1536), (3072, 576), (100, 72)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@torch.no_grad()
def test_rows_do_not_depend_on_the_rows_beside_them(dtype, n, k, bias):
    gen = torch.Generator().manual_seed(n + k + bias)
    w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    x = torch.randn(300, k, generator=gen).to(dtype)
    many = invariant_linear(x, w, b)
    for start, rows in [(0, 1), (7, 1), (0, 3), (5, 17), (40, 33), (0, 64), (100, 65), (13, 130)]:
        got = invariant_linear(x[start:start + rows].clone(), w, b)
        assert torch.equal(got, many[start:start + rows]), (start, rows)
    shaped = invariant_linear(x[:12].reshape(3, 4, k), w, b)  # more dims: the same rows
    assert torch.equal(shaped.reshape(12, n), many[:12])
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many.float(), F.linear(x, w, b).float(), **tol)


def test_under_autograd_a_large_call_is_f_linear_and_gradients_flow():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 40, generator=gen).requires_grad_()
    x = torch.randn(70, 40, generator=gen).requires_grad_()
    out = invariant_linear(x, w)
    assert torch.equal(out, F.linear(x, w))
    small = invariant_linear(x[:5], w)  # one padded block, as without autograd
    with torch.no_grad():
        assert torch.equal(small, invariant_linear(x[:5], w))
    (out.sum() + small.sum()).backward()
    want = torch.ones(70, 48)
    want[:5] += 1
    torch.testing.assert_close(x.grad, want @ w.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sizes,k", [((256,), 512), ((256, 128, 128), 256), ((576,), 1536)])
@torch.no_grad()
def test_the_engines_fused_linear_rows_do_not_depend_on_the_call(dtype, sizes, k):
    """The engine's projections (FusedLinear, kind auto: the AMX kernel, oneDNN or invariant_linear as the CPU
    has them) give each row the same bits at every row count a step can have."""
    gen = torch.Generator().manual_seed(k + len(sizes))
    modules = [torch.nn.Linear(k, n, bias=False).to(dtype) for n in sizes]
    for m in modules:
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * k ** -0.5)
    fused = FusedLinear(modules)
    x = torch.randn(400, k, generator=gen).to(dtype)
    many = fused(x)
    counts = (1, 2, 5, 16, 31, 33, 64, 65, 100, 150, 199)
    bad = [rows for rows in counts if not torch.equal(fused(x[:rows]), many[:rows])]
    assert not bad, f"rows that differ from the 400-row call at these counts: {bad}"
