"""reward_bt_loss: torch path and Triton kernels (interpreted on CPU) against a float64 plain
autograd reference, loss, rewards and every gradient."""

import pytest
import torch
import torch.nn.functional as F

import cai_fast.ops as ops
from cai_fast.ops.testing import (
    assert_close,
    assert_same_outputs_and_grads,
    outputs_and_grads,
)

from helpers.ops import PATHS


TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (1e-2, 1e-2)}
SHAPES = {"odd": (47, 31, 16), "realistic": (32, 576, None)}  # (B, H, Triton block over H): 16 ∤ 31
NAMES = ["h_chosen", "h_rejected", "head_weight", "head_bias"]


def _inputs(shape_name, dtype, weight_shape="[1, H]", scale=1.0, seed=0):
    n_rows, size, _ = SHAPES[shape_name]
    generator = torch.Generator().manual_seed(seed)
    h_chosen, h_rejected = (torch.randn(n_rows, size, generator=generator) * scale for _ in range(2))
    weight = torch.randn(1, size, generator=generator) / size**0.5
    weight = weight if weight_shape == "[1, H]" else weight[0]
    bias = torch.randn(1, generator=generator)
    p = torch.rand(n_rows, generator=generator)
    margin = torch.randn(n_rows, generator=generator) * 0.5
    fast = [t.to(dtype) for t in (h_chosen, h_rejected, weight, bias)]
    return fast, [t.double() for t in fast], p, margin


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin_kind", ["no-margin", "float-margin", "row-margins"])
def test_matches_reference(path, dtype, shape_name, reduction, margin_kind):
    fast_inputs, ref_inputs, p, margin = _inputs(shape_name, dtype)
    margin = {"no-margin": None, "float-margin": 0.3, "row-margins": margin}[margin_kind]
    margin64 = margin.double() if isinstance(margin, torch.Tensor) else margin

    def fast(*inputs):
        return ops.reward_bt_loss(*inputs, p, margin, reduction)

    def reference(*inputs):
        return ops.reward_bt_loss_reference(*inputs, p.double(), margin64, reduction)

    with ops.use_path(path, block_size=SHAPES[shape_name][-1]):
        assert_same_outputs_and_grads(fast, reference, fast_inputs, ref_inputs, TOL[dtype], NAMES)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_shape, with_bias, p", [("[H]", False, 0.8), ("[1, H]", True, 1.0)])
def test_head_shapes_bias_and_float_label(path, weight_shape, with_bias, p):
    fast_inputs, ref_inputs, _, _ = _inputs("odd", torch.float32, weight_shape)
    if not with_bias:
        fast_inputs[3] = ref_inputs[3] = None
    with ops.use_path(path):
        assert_same_outputs_and_grads(lambda *x: ops.reward_bt_loss(*x, p),
                                      lambda *x: ops.reward_bt_loss_reference(*x, p),
                                      fast_inputs, ref_inputs, TOL[torch.float32], NAMES)


@pytest.mark.parametrize("path", PATHS)
def test_hard_label_is_the_plain_bradley_terry_loss(path):
    (h_c, h_r, w, b), _, _, _ = _inputs("odd", torch.float32)
    with ops.use_path(path):
        loss, r_c, r_r = ops.reward_bt_loss(h_c, h_r, w, b, 1.0, reduction="none")
    assert_close("loss", loss, F.softplus(-(r_c - r_r)), 1e-6, 1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_huge_reward_gaps_stay_finite_and_exact(path):
    fast_inputs, ref_inputs, p, _ = _inputs("odd", torch.float32, scale=1e3)
    with ops.use_path(path):
        outs, grads = outputs_and_grads(lambda *x: ops.reward_bt_loss(*x, p, reduction="sum"), fast_inputs)
    ref_outs, ref_grads = outputs_and_grads(lambda *x: ops.reward_bt_loss_reference(
        *x, p.double(), reduction="sum"), ref_inputs)
    assert bool(outs[0].isfinite()) and outs[0] > 100, "the gaps should be huge"
    assert_close("loss", outs[0], ref_outs[0], 1e-3, 1e-5)
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close(f"grad of {name}", got, want, 1e-3, 1e-4)


@pytest.mark.parametrize("change, message", [
    (dict(p=1.5), r"p must be probabilities in \[0, 1\]"),
    (dict(p=torch.rand(46)), r"p must be a float or a \[B=47\] tensor"),
    (dict(margin=torch.rand(2, 47)), r"margin must be a float or a \[B=47\] tensor"),
    (dict(h_rejected=torch.randn(46, 31)), r"h_chosen and h_rejected must both be \[B, H\]"),
    (dict(head_weight=torch.randn(2, 31)), r"head_weight must be \[H=31\] or \[1, H\]"),
    (dict(head_bias=torch.randn(2)), r"head_bias must hold one value or be None"),
    (dict(reduction="max"), r"reduction must be one of"),
])
def test_bad_arguments_are_named(change, message):
    (h_c, h_r, w, b), _, p, _ = _inputs("odd", torch.float32)
    kwargs = dict(h_chosen=h_c, h_rejected=h_r, head_weight=w, head_bias=b, p=p) | change
    with pytest.raises(ValueError, match=message):
        ops.reward_bt_loss(**kwargs)
