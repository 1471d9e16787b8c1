"""The AMX linear (cai_fast._core.amx_linear, csrc/linear.cpp) against its twins: the fp32 product
rounded once to bf16, and oneDNN's bf16 linear (what the engine runs without it), on random
weights and rows of every count that splits the tiles differently, with and without a bias, on
1-3 threads; its packing against the layout written out in torch; the engine on it against the
engine on oneDNN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cai_fast.engine import cpu_paths, linear
from cai_fast._native import _core

pytestmark = pytest.mark.skipif(not (linear.HAVE_AMX and cpu_paths.amx_allowed()),
                                reason="needs cai_fast._core and a CPU with AMX-BF16 tiles "
                                       "(not forced off: CAI_FAST_CPU)")

BF16_ULP = 2.0 ** -7  # bf16's relative spacing: one rounding step


def _case(m: int, n: int, k: int, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) / k**0.5).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    return x, w, b


def _exact(x, w, b):
    """The product in fp32 (bf16 inputs are exact in fp32), plus the bias, before rounding."""
    out = x.double() @ w.double().T
    return out + b.double() if b is not None else out


@pytest.mark.parametrize("m", [1, 3, 16, 17, 32, 33, 70])
@pytest.mark.parametrize("n,k", [(32, 32), (64, 96), (960, 576), (576, 1536)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_amx_linear_is_the_product_rounded_once_to_bf16(m, n, k, bias):
    x, w, b = _case(m, n, k, bias, seed=m * 7 + n + k)
    got = linear.linear(x, linear.pack(w), b)
    exact = _exact(x, w, b)
    # fp32 sums in another order than the exact one: within a bf16 step of it, and equal to the
    # exact product rounded to bf16 nearly everywhere
    torch.testing.assert_close(got.double(), exact, rtol=BF16_ULP, atol=1e-6)
    assert (got != exact.bfloat16()).double().mean() < 0.01
    # and so within a step of oneDNN's bf16 linear (the engine's path without the kernel)
    twin = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w), b, "none", [], "")
    torch.testing.assert_close(got.float(), twin.float(), rtol=2 * BF16_ULP, atol=1e-5)
    torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=2 * BF16_ULP, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_linear_does_not_depend_on_the_thread_count(threads):
    x, w, b = _case(21, 352, 128, True, seed=5)  # 11 column blocks: uneven shares
    packed = linear.pack(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = linear.linear(x, packed, b)
        torch.set_num_threads(threads)
        assert torch.equal(linear.linear(x, packed, b), want)
    finally:
        torch.set_num_threads(before)


def test_the_packing_is_the_layout_linear_h_describes():
    n, k = 96, 64
    w = (torch.randn(n, k) * 100).bfloat16()
    # packed[((b * k/32 + s) * 2 + h) * 512 + r * 32 + c * 2 + j] = w[32 b + 16 h + c, 32 s + 2 r + j]
    want = w.reshape(n // 32, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, k)
    assert torch.equal(linear.pack(w), want)


def test_more_dims_and_a_strided_x():
    x, w, b = _case(12, 64, 64, True, seed=3)
    packed = linear.pack(w)
    flat = linear.linear(x, packed, b)
    assert torch.equal(linear.linear(x.reshape(3, 4, 64), packed, b), flat.reshape(3, 4, 64))
    wide = torch.cat([x, x], 1)[:, :64]  # rows 128 apart: copied to contiguous rows first
    assert torch.equal(linear.linear(wide, packed, b), flat)


def test_which_weights_the_kernel_takes():
    assert linear.takes(torch.randn(64, 96).bfloat16())
    assert not linear.takes(torch.randn(64, 96))  # fp32: oneDNN / F.linear
    assert not linear.takes(torch.randn(64, 96).half())
    assert not linear.takes(torch.randn(48, 96).bfloat16())  # n not a multiple of 32
    assert not linear.takes(torch.randn(64, 80).bfloat16())  # k not a multiple of 32


def test_bad_input_is_refused_with_the_sizes():
    packed = linear.pack(torch.randn(64, 96).bfloat16())
    with pytest.raises(ValueError, match=r"x \(4, 95\) torch.bfloat16 .* does not fit a bf16 weight of 64 x 96"):
        linear.linear(torch.randn(4, 95).bfloat16(), packed)
    with pytest.raises(ValueError, match="does not fit"):
        linear.linear(torch.randn(4, 96), packed)  # fp32 rows
    with pytest.raises(ValueError, match="n and k must be positive multiples of 32 .*n=48, k=96"):
        linear.pack(torch.randn(48, 96).bfloat16())
    with pytest.raises(ValueError, match="n and k must be positive multiples of 32"):
        _core.amx_linear(0, 1, 96, 0, 40, 0, 0)


def test_the_engine_on_the_kernel_equals_the_engine_on_onednn(tmp_path):
    """A tiny bf16 Llama whose projections the kernel takes (sizes multiples of 32; the LM head's
    vocabulary is not, so it stays on oneDNN): greedy tokens and option scores as on oneDNN."""
    from helpers.tiny import build_tiny_model
    from helpers.engine import random_prompts

    from cai_fast.engine import SamplingParams, load_model
    from cai_fast.engine.cached import CachedGenerator, EngineConfig

    loaded = load_model(str(build_tiny_model(tmp_path / "tiny", hidden=128)), dtype="bfloat16")
    prompts = random_prompts(5, 6, shared=40)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    outs = {}
    for kind in ("auto", "onednn"):
        engine = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(block_size=16, linear=kind))
        layer = engine.runner.projections[0]
        assert (layer.qkv.__self__.amx is not None) == (layer.o.amx is not None) == (kind == "auto")
        assert engine.runner.head.amx is None  # a vocabulary of 400 columns: oneDNN
        outs[kind] = ([c.token_ids for c in engine.generate(prompts, params)],
                      engine.score_options(prompts, [[5], [9]]))
    assert outs["auto"][0] == outs["onednn"][0]
    torch.testing.assert_close(outs["auto"][1], outs["onednn"][1], atol=0.02, rtol=0)


def test_an_unknown_linear_kind_is_refused(tiny_loaded):
    from cai_fast.engine.cached import CachedGenerator, EngineConfig

    with pytest.raises(ValueError, match="linear must be one of auto, onednn, got 'mkl'"):
        CachedGenerator(tiny_loaded.model, tiny_loaded.tokenizer, EngineConfig(linear="mkl"))
