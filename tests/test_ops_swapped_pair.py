"""swapped_pair_scores: torch path and Triton kernel (interpreted on CPU) against a float64
full-vocabulary reference; the swap antisymmetry label(b, a) = 1 − label(a, b)."""

import pytest
import torch

import cai_fast.ops as ops
from cai_fast.ops.testing import assert_close, random_head

from helpers.ops import PATHS


TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5)}  # bf16 values, fp32 math: no loss
# (M pairs, P principles, H, V, Triton block over H): 16 ∤ 31
SHAPES = {"odd": (7, 3, 31, 123, 16), "one-principle": (5, 1, 31, 123, None),
          "realistic": (16, 4, 64, 512, None)}
OPTIONS = (11, 29)


def _pairs(shape_name, dtype, seed=0):
    """hidden [M, P, 2, H], weight, bias in dtype and their float64 copies."""
    m, p, size, vocab, _ = SHAPES[shape_name]
    (flat, weight, bias), (flat64, weight64, bias64) = random_head(m * p * 2, size, vocab, dtype, seed)
    return (flat.reshape(m, p, 2, size), weight, bias), (flat64.reshape(m, p, 2, size), weight64, bias64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("aggregate", ["prob", "logodds"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_matches_full_vocabulary_reference(path, dtype, shape_name, aggregate, with_bias):
    (hidden, weight, bias), (hidden64, weight64, bias64) = _pairs(shape_name, dtype)
    with ops.use_path(path, block_size=SHAPES[shape_name][-1]):
        scores = ops.swapped_pair_scores(hidden, weight, OPTIONS, bias if with_bias else None, aggregate)
    expected = ops.swapped_pair_scores_reference(hidden64, weight64, OPTIONS,
                                                 bias64 if with_bias else None, aggregate)
    for name, got, want in zip(ops.PairScores._fields, scores, expected):
        assert_close(name, got, want, *TOL[dtype])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("aggregate", ["prob", "logodds"])
def test_exchanging_the_responses_gives_one_minus_the_label(path, dtype, aggregate):
    """Bit for bit on the torch path (float64 sums of the fp32 results are exactly 1); the Triton
    kernel to fp32 rounding."""
    (hidden, weight, bias), _ = _pairs("odd", dtype, seed=5)
    hidden = hidden * 3  # confident judgements too, far from ½
    with ops.use_path(path):
        ab = ops.swapped_pair_scores(hidden, weight, OPTIONS, bias, aggregate)
        ba = ops.swapped_pair_scores(hidden.flip(2), weight, OPTIONS, bias, aggregate)
    tol = 0 if path == "torch" else 1e-6
    for name, got, want in (("label", ba.label, ab.label), ("label_mean", ba.label_mean, ab.label_mean),
                            ("p_ab_a", ba.p_ab_a, ab.p_ba_b)):
        assert_close(name, got.double() + want.double(), torch.ones_like(want, dtype=torch.float64), tol, 0)
    assert bool(((ab.label > 0.9) | (ab.label < 0.1)).any()), "inputs too timid to test"


@pytest.mark.parametrize("aggregate", ["prob", "logodds"])
def test_a_pairs_scores_do_not_depend_on_the_other_pairs(aggregate):
    (hidden, weight, bias), _ = _pairs("realistic", torch.float32, seed=2)
    together = ops.swapped_pair_scores(hidden, weight, OPTIONS, bias, aggregate)
    for m in (0, 5, 15):
        alone = ops.swapped_pair_scores(hidden[m : m + 1], weight, OPTIONS, bias, aggregate)
        for name, got, want in zip(ops.PairScores._fields, alone, together):
            assert torch.equal(got, want[m : m + 1]), (name, m)


@pytest.mark.parametrize("aggregate", ["prob", "logodds"])
def test_scores_do_not_depend_on_the_gaps_memory_layout(aggregate):
    """Gaps sliced out of a larger tensor (as the judge's are) score as their contiguous copies:
    torch's fp32 sigmoid differs in the last bit between its strided and contiguous loops."""
    gaps = torch.randn(200, 4, 2, generator=torch.Generator().manual_seed(0)) * 0.05
    strided = ops.swapped_pair.scores_from_gaps(gaps[:, :, 0], gaps[:, :, 1], aggregate)
    contiguous = ops.swapped_pair.scores_from_gaps(gaps[:, :, 0].contiguous(), gaps[:, :, 1].contiguous(), aggregate)
    for name, got, want in zip(ops.PairScores._fields, strided, contiguous):
        assert torch.equal(got, want), name


def test_complementary_values_add_up_to_one_exactly():
    """Around ½ too, where 1 − x is not exact below ½, and at ties."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(1000, generator=gen), 0.5 + (torch.rand(1000, generator=gen) - 0.5) * 1e-6,
                   torch.tensor([0.5, 0.0, 1.0, 1e-30])])
    swapped = (1 - x) + (torch.rand(x.shape, generator=gen) - 0.5) * 1e-7  # as rounding leaves them
    swapped[-4] = 0.5
    total = ops.swapped_pair.complementary(x, swapped).double() + ops.swapped_pair.complementary(swapped, x).double()
    assert torch.equal(total, torch.ones_like(total))
    assert ops.swapped_pair.complementary(x, swapped)[-4] == 0.5


@pytest.mark.parametrize("path", PATHS)
def test_agrees_with_option_logprobs_renormalised(path):
    (hidden, weight, bias), _ = _pairs("odd", torch.float32)
    with ops.use_path(path):
        scores = ops.swapped_pair_scores(hidden, weight, OPTIONS, bias)
        logp, _ = ops.linear_option_logprobs(hidden.reshape(-1, 31), weight, torch.tensor(OPTIONS), bias)
    probs = torch.softmax(logp, dim=1).reshape(7, 3, 2, 2)
    assert_close("p_ab_a", scores.p_ab_a, probs[:, :, 0, 0], 1e-5, 0)
    assert_close("p_ba_b", scores.p_ba_b, probs[:, :, 1, 1], 1e-5, 0)


def test_runs_without_gradients():
    (hidden, weight, bias), _ = _pairs("odd", torch.float32)
    scores = ops.swapped_pair_scores(hidden.requires_grad_(True), weight, OPTIONS, bias)
    assert not any(t.requires_grad for t in scores)


@pytest.mark.parametrize("change, message", [
    (dict(option_ids=(3, 3)), r"option_ids must be two distinct token ids in \[0, 123\), got \(3, 3\)"),
    (dict(option_ids=(3, 123)), r"option_ids must be two distinct"),
    (dict(hidden=torch.randn(7, 3, 31)), r"hidden must have 4 dims"),
    (dict(hidden=torch.randn(7, 3, 3, 31)), r"hidden must be \[M, P, 2 orders, H\]"),
    (dict(aggregate="median"), r"aggregate must be one of \('prob', 'logodds'\)"),
])
def test_bad_arguments_are_named(change, message):
    (hidden, weight, _), _ = _pairs("odd", torch.float32)
    kwargs = dict(hidden=hidden, weight=weight, option_ids=OPTIONS) | change
    with pytest.raises(ValueError, match=message):
        ops.swapped_pair_scores(**kwargs)
