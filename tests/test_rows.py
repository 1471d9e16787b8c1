"""The row kernels (cai_fast._core.add_rms_norm / silu_mul, csrc/rows.cpp) against their twins,
transformers' LlamaRMSNorm (after torch's residual add) and SiLU(gate) * up: random rows of odd
widths, large and small magnitudes, fp32 and bf16; the runner on them against the model's modules."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from cai_fast.engine import rows

pytestmark = pytest.mark.skipif(not rows.HAVE_ROW_KERNELS, reason="cai_fast._core is not built (pip install .)")


def _norm(width: int, dtype: torch.dtype, seed: int) -> LlamaRMSNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = torch.randn(width, generator=gen) * 2
    return norm.to(dtype)


@pytest.mark.parametrize("portable", [False, True], ids=["avx512", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1, 7, 64, 576, 1000])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_add_rms_norm_equals_the_add_and_llama_rms_norm(dtype, width, scale, portable):
    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(37, width, generator=gen) * scale).to(dtype)
    delta = (torch.randn(37, width, generator=gen) * scale).to(dtype)
    norm = _norm(width, dtype, 1)
    want_x = x + delta
    want = norm(want_x)
    mine = x.clone()
    got = rows.add_rms_norm(mine, delta, norm, portable)
    assert torch.equal(mine, want_x)  # the residual add, in place, as torch rounds it
    # within an ulp or two: the squares are summed in double here, in fp32 by torch (so in fp32 a
    # row's scale, and with it the whole row, is off by an ulp now and then; bf16 rounding hides most)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20
    torch.testing.assert_close(got.float(), want.float(), atol=1e-30, rtol=ulp)
    if dtype == torch.bfloat16:
        assert (got != want).float().mean() < 0.02
    alone = x.clone()
    torch.testing.assert_close(rows.add_rms_norm(alone, None, norm, portable).float(), norm(x).float(), atol=1e-30,
                               rtol=ulp)
    assert torch.equal(alone, x)  # no delta: x untouched


@pytest.mark.parametrize("portable", [False, True], ids=["avx512", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1, 13, 64, 1536])
def test_silu_mul_equals_silu_then_mul(dtype, width, portable):
    gen = torch.Generator().manual_seed(width)
    gate_up = (torch.randn(9, 2 * width, generator=gen) * 6).to(dtype)
    gate_up[0, :3] = torch.tensor([-100.0, 95.0, 0.0])[: min(3, width)]  # exp's ends
    gate, up = gate_up.split(width, -1)
    want = ACT2FN["silu"](gate) * up
    got = rows.silu_mul(gate_up, portable)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=ulp)
    if dtype == torch.bfloat16:  # exp's last bit differs from torch's now and then; bf16 hides most
        assert (got != want).float().mean() < 0.02


def test_which_modules_the_kernels_take():
    x = torch.randn(4, 8)
    assert rows.takes_norm(_norm(8, torch.float32, 0), x)
    assert not rows.takes_norm(_norm(8, torch.float32, 0), x.half())  # fp16: torch
    assert not rows.takes_norm(torch.nn.LayerNorm(8), x)  # not an RMSNorm
    assert not rows.takes_norm(_norm(8, torch.float32, 0), x.t().contiguous().t())  # strided rows
    assert rows.takes_silu_mul(ACT2FN["silu"], x)
    assert not rows.takes_silu_mul(ACT2FN["gelu"], x)
    assert rows.takes_silu_mul(ACT2FN["silu"], torch.randn(2048, 8))  # a prefill's rows too: one rounding for all


def test_a_mismatched_delta_is_refused():
    with pytest.raises(ValueError, match="delta .* does not match x"):
        rows.add_rms_norm(torch.randn(4, 8), torch.randn(4, 9), _norm(8, torch.float32, 0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"], ids=["fp32", "bf16"])
def test_the_runner_on_the_row_kernels_matches_the_model(tiny_model_path, dtype):
    """The fused runner (row kernels, CPU decode kernel) against the unfused one (the model's own
    modules) on prefill and decode forwards: equal up to rounding."""
    from helpers.engine import random_prompts

    from cai_fast.engine import SamplingParams, load_model
    from cai_fast.engine.cached import CachedGenerator, EngineConfig

    loaded = load_model(str(tiny_model_path), dtype=dtype)
    prompts = random_prompts(3, 6, shared=20)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    outs = {}
    for fused in (True, False):
        engine = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(block_size=16, fused=fused))
        outs[fused] = [c.token_ids for c in engine.generate(prompts, params)]
        scores = engine.score_options(prompts, [[5], [9]])
        outs[f"scores{fused}"] = scores
    assert outs[True] == outs[False]
    torch.testing.assert_close(outs["scoresTrue"], outs["scoresFalse"], atol=0.02 if dtype == "bfloat16" else 1e-4,
                               rtol=0)


@pytest.mark.parametrize("portable", [False, True], ids=["avx512", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [1, 7, 16, 400, 49152])
def test_argmax_equals_torch_argmax_ties_nans_and_infinities_included(dtype, width, portable):
    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(11, width, generator=gen) * 3).to(dtype)
    x[1] = x[1].round()  # many ties: torch takes the first of them
    x[2] = float("-inf")  # all -inf: index 0
    x[3, width // 2] = float("nan")  # a NaN counts as the maximum
    x[4, -1] = float("nan")
    x[4, 0] = float("inf")
    x[5] = 2.0  # all equal
    x[6, -1] = x[6].max() + 1  # the maximum last
    assert torch.equal(rows.argmax(x, portable), x.argmax(-1))
    one = x[7:8].contiguous()
    assert torch.equal(rows.argmax(one, portable), one.argmax(-1))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 37])
def test_the_kernels_do_not_depend_on_the_thread_count(threads, n):
    """Each kernel shares its rows among torch's threads: any count of threads and rows (shares of
    uneven sizes, fewer rows than a share's least) gives what one thread gives, bit for bit."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 576, generator=gen).bfloat16()
    delta = torch.randn(n, 576, generator=gen).bfloat16()
    gate_up = (torch.randn(n, 2 * 1536, generator=gen) * 6).bfloat16()
    logits = torch.randn(n, 4096, generator=gen).bfloat16()
    norm = _norm(576, torch.bfloat16, 2)

    def run():
        added = x.clone()
        return rows.add_rms_norm(added, delta, norm), added, rows.silu_mul(gate_up), rows.argmax(logits)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run()
        torch.set_num_threads(threads)
        shared = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(alone, shared):
        assert torch.equal(a, b)
    assert torch.equal(shared[3], logits.argmax(-1))


def test_greedy_sampling_takes_the_kernel_where_it_applies():
    from cai_fast.engine.sampling import greedy

    x = torch.randn(5, 96)
    assert rows.takes_argmax(x) and rows.takes_argmax(x.bfloat16())
    assert not rows.takes_argmax(x.half())  # fp16: torch.argmax
    assert not rows.takes_argmax(x[:, ::2])  # strided rows
    for logits in (x, x.bfloat16(), x.half(), x[:, ::2]):
        assert torch.equal(greedy(logits), logits.argmax(-1))
