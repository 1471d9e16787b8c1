"""fused_linear_cross_entropy: torch chunked path and Triton kernels (interpreted on CPU) against
a float64 unfused reference, loss and every gradient."""

import pytest
import torch
import torch.nn.functional as F

import cai_fast.ops as ops
from cai_fast.ops.testing import (
    assert_close,
    assert_same_outputs_and_grads,
    outputs_and_grads,
    random_head,
)

from helpers.ops import PATHS


TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (3e-2, 3e-2)}
SHAPES = {"odd": (47, 31, 123), "realistic": (96, 64, 512)}
# (shape, rows per tile, Triton block over V): 13 ∤ 47 and 32 ∤ 123; None lets the op choose
LAYOUTS = {"odd-auto": ("odd", None, None), "odd-13rows-32cols": ("odd", 13, 32),
           "realistic-auto": ("realistic", None, None)}


def _targets(n_rows, vocab, ignored_every=5, seed=1):
    targets = torch.randint(0, vocab, (n_rows,), generator=torch.Generator().manual_seed(seed))
    targets[::ignored_every] = -100
    return targets


def _compare(path, layout, dtype, targets=None, **options):
    shape_name, chunk_rows, block_size = LAYOUTS[layout]
    shape = SHAPES[shape_name]
    fast_inputs, ref_inputs = random_head(*shape, dtype=dtype)
    targets = _targets(shape[0], shape[2]) if targets is None else targets
    fast_inputs = [*fast_inputs[:2], fast_inputs[2] if options.pop("bias", True) else None]
    ref_inputs = [*ref_inputs[:2], ref_inputs[2] if fast_inputs[2] is not None else None]

    def fast(h, w, b):
        return ops.fused_linear_cross_entropy(h, w, targets, b, **options)

    def reference(h, w, b):
        return ops.fused_linear_cross_entropy_reference(h, w, targets, b, **options)

    with ops.use_path(path, chunk_rows=chunk_rows, block_size=block_size):
        assert_same_outputs_and_grads(fast, reference, fast_inputs, ref_inputs, TOL[dtype],
                                      ["hidden", "weight", "bias"])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_option_on_matches_reference(path, dtype, layout, reduction):
    _compare(path, layout, dtype, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("options", [
    dict(bias=False), dict(label_smoothing=0.25, bias=False), dict(z_loss=1e-2, bias=False),
    dict(label_smoothing=1.0), dict(ignore_index=7)], ids=["plain", "smoothing", "z_loss",
                                                           "smoothing=1", "ignore_index=7"])
def test_each_option_alone_matches_reference(path, options):
    targets = _targets(*SHAPES["odd"][::2], ignored_every=4)
    targets[targets == -100] = options.get("ignore_index", -100)
    _compare(path, "odd-13rows-32cols", torch.float32, targets=targets, **options)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(path, reduction):
    (hidden, weight, bias), _ = random_head(*SHAPES["odd"])
    targets = torch.full((hidden.shape[0],), -100)
    with ops.use_path(path):
        outs, grads = outputs_and_grads(lambda h, w, b: ops.fused_linear_cross_entropy(
            h, w, targets, b, z_loss=1e-2, reduction=reduction), [hidden, weight, bias])
    assert_close("loss", outs[0], torch.zeros_like(outs[0]), 0, 0)
    for name, grad in zip(["hidden", "weight", "bias"], grads):
        assert_close(f"grad of {name}", grad, torch.zeros_like(grad), 0, 0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_same_as_torch_cross_entropy_on_the_logits(label_smoothing):
    (hidden, weight, _), _ = random_head(*SHAPES["realistic"])
    targets = _targets(hidden.shape[0], weight.shape[0])
    with ops.use_path("torch"):
        fused = ops.fused_linear_cross_entropy(hidden, weight, targets, label_smoothing=label_smoothing)
    unfused = F.cross_entropy(hidden @ weight.T, targets, label_smoothing=label_smoothing)
    assert_close("loss", fused, unfused, 1e-5, 1e-5)


def test_no_grad_and_frozen_weight_give_the_same_loss():
    (hidden, weight, bias), _ = random_head(*SHAPES["odd"])
    targets = _targets(hidden.shape[0], weight.shape[0])
    with torch.no_grad():
        loss_no_grad = ops.fused_linear_cross_entropy(hidden, weight, targets, bias, z_loss=1e-3)
    hidden = hidden.clone().requires_grad_(True)
    loss = ops.fused_linear_cross_entropy(hidden, weight, targets, bias, z_loss=1e-3)
    loss.backward()
    assert_close("loss", loss.detach(), loss_no_grad, 0, 0)
    assert hidden.grad is not None and weight.grad is None


def test_backward_twice_is_refused():
    (hidden, weight, _), _ = random_head(*SHAPES["odd"])
    hidden.requires_grad_(True)
    loss = ops.fused_linear_cross_entropy(hidden, weight, _targets(47, 123))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("change, message", [
    (dict(targets=torch.full((47,), 123)), r"targets\[0\] = 123 is outside the vocabulary"),
    (dict(targets=torch.zeros(46, dtype=torch.int64)), r"targets must be int64 of shape \(47,\)"),
    (dict(weight=torch.randn(123, 30)), r"weight must be \[V, H=31\]"),
    (dict(reduction="avg"), r"reduction must be one of"),
    (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
    (dict(bias=torch.randn(123, dtype=torch.float64)), r"bias is torch.float64"),
])
def test_bad_arguments_are_named(change, message):
    (hidden, weight, _), _ = random_head(*SHAPES["odd"])
    kwargs = dict(hidden=hidden, weight=weight, targets=_targets(47, 123)) | change
    with pytest.raises(ValueError, match=message):
        ops.fused_linear_cross_entropy(**kwargs)
