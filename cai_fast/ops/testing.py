"""Helpers that hold an op against its reference: values and every gradient, with a report of the
mismatching elements. Used by the tests (tests/test_ops_*.py) and the GPU bench (benches/gpu_ops.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor | None], seed: int = 0):
    """Run fn(*inputs) on fresh leaf copies and backpropagate a fixed random weighting of every
    floating output (the same for every fn given the same output shapes and seed).

    Returns (outputs as a tuple of detached tensors, grads of the inputs — None for inputs that
    are None or not floating).
    """
    leaves = [None if x is None else x.detach().clone().requires_grad_(x.is_floating_point())
              for x in inputs]
    out = fn(*leaves)
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    generator = torch.Generator().manual_seed(seed)
    total = sum((o.double() * torch.randn(o.shape, generator=generator, dtype=torch.float64)
                 .to(o.device)).sum() for o in outs if o.is_floating_point())
    if total.requires_grad:
        total.backward()
    grads = [None if x is None or not x.requires_grad else x.grad for x in leaves]
    return tuple(o.detach() for o in outs), grads


def assert_close(name: str, actual: torch.Tensor | None, expected: torch.Tensor | None,
                 atol: float, rtol: float, shown: int = 8) -> None:
    """Like torch.testing.assert_close on float64 copies, but the message lists the worst
    mismatching elements (index, actual, expected) so a failure says where it is."""
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{name}: one of the two is None"
        return
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    excess = (a - e).abs() - (atol + rtol * e.abs())
    excess = torch.where(torch.isnan(a) != torch.isnan(e), torch.inf, excess.nan_to_num(0.0))
    bad = excess > 0
    if bool(bad.any()):
        order = excess.flatten().argsort(descending=True)[: min(shown, int(bad.sum()))]
        rows = [f"  {tuple(int(i) for i in torch.unravel_index(k, a.shape))}: actual "
                f"{a.flatten()[k].item():.6g}, expected {e.flatten()[k].item():.6g}" for k in order]
        raise AssertionError(f"{name}: {int(bad.sum())} of {a.numel()} elements differ beyond "
                             f"atol={atol}, rtol={rtol}; worst:\n" + "\n".join(rows))


def assert_same_outputs_and_grads(fast, reference, fast_inputs, reference_inputs, tol, names):
    """Compare fast(*fast_inputs) with reference(*reference_inputs): every output and the grad of
    every input. tol = (atol, rtol); names label the inputs in failure messages."""
    outs, grads = outputs_and_grads(fast, fast_inputs)
    ref_outs, ref_grads = outputs_and_grads(reference, reference_inputs)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert_close(f"output {i}", o, r, *tol)
    for name, g, r in zip(names, grads, ref_grads):
        assert_close(f"grad of {name}", g, r, *tol)


def triton_import_error() -> str:
    """'' when triton imports, else the reason it does not (tests skip the Triton path with it).
    Import it only after TRITON_INTERPRET is set."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton cannot be imported: {error}"
    return ""


def random_head(n_rows: int, size: int, vocab: int, dtype=torch.float32, seed: int = 0):
    """Random hidden [N, H], LM-head weight [V, H] and bias [V] giving logits of spread about 2,
    cast to dtype, and their exact float64 copies: (fast_inputs, reference_inputs)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, size, generator=generator)
    weight = torch.randn(vocab, size, generator=generator) * (2.0 / size**0.5)
    bias = torch.randn(vocab, generator=generator) * 0.5
    fast = [t.to(dtype) for t in (hidden, weight, bias)]
    return fast, [t.double() for t in fast]
