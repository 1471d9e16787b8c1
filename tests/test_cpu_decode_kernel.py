"""The CPU decode kernel (cai_fast._core.paged_decode_attention, csrc/paged_attention.cpp) against
its twin, the torch path's decode (TorchPagedAttention: gathered keys, cascade over the shared
blocks, torch's flash kernel): random pools with NaN in every block nobody owns, block sizes 1, 16
and 256, ragged and shared contexts, a sliding window, GQA groups of 1 to 6 query heads, head dims
12 (the plain loops), 64 (AVX-512, and AVX512-BF16 scores in bf16) and 80 (AVX-512 with a part of
16 columns), fp32 and bf16, the AVX-512 loops and the plain ones, 1 and 2 threads; the rotary
embedding and pool write done inside the kernel against transformers' apply_rotary_pos_emb and
KVPool.write (bit for bit); bad tables refused; the engine on this path against the torch path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cai_fast.engine.attention import HAVE_CPU_KERNEL, CpuPagedAttention, TorchPagedAttention, paged_decode
from cai_fast.engine.kv import KVPool, KVShape

from helpers.paged import paged_batch


pytestmark = pytest.mark.skipif(not HAVE_CPU_KERNEL, reason="cai_fast._core is not built (pip install .)")

# block size, context lengths, leading blocks every request shares, window of layer 1
CASES = {
    "bs1-shared": (1, (5, 9, 3), 2, None),
    "bs16-shared-ragged": (16, (37, 70, 49, 33, 65), 2, None),
    "bs16-window": (16, (37, 70, 49), 2, 21),
    "bs16-one-request": (16, (45,), 0, None),
    "bs16-first-token": (16, (1, 17, 16), 0, None),
    "bs256-shared": (256, (300, 290), 1, None),
}
# kv heads, query heads, head dim
SHAPES = {"g3-d12": (2, 6, 12), "g1-d64": (3, 3, 64), "g5-d64": (1, 5, 64), "g6-d80": (2, 12, 80), "g4-d64": (2, 8, 64)}


def _batch(seed: int, case: str, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """A pool of random K/V (NaN in blocks nobody owns) and block tables sharing their first
    blocks (the Triton kernel's tests' pools, in other shapes), and its decode layout."""
    block_size, kv_lens, shared_blocks, _ = CASES[case]
    pool, layout = paged_batch(seed, kv_lens, [1] * len(kv_lens), shared_blocks, block_size, dtype=dtype,
                               shape=KVShape(2, kv_heads, head_dim, dtype))
    return pool, dataclasses.replace(layout, host_tables=[t.tolist() for t in layout.tables])


def _new_tokens(seed: int, batch: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v of the new tokens as the runner has them (views of one fused projection's output,
    rows strided) and rotary tables of random positions."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=gen) * 2).to(dtype)
    q, k, v = (t.reshape(batch, -1, head_dim) for t in qkv.split([heads * head_dim, *[kv_heads * head_dim] * 2], -1))
    angles = torch.randint(0, 4000, (batch, 1), generator=gen) * 10000 ** -(torch.arange(head_dim // 2) / (head_dim // 2))
    emb = torch.cat([angles, angles], -1)
    return q, k, v, emb.cos().to(dtype), emb.sin().to(dtype)


def _both(case: str, shape: str, dtype: torch.dtype, portable: bool = False):
    """Per layer: (kernel output, torch path output) with the rotary and the write inside the
    kernel, and both pools after the step."""
    kv_heads, heads, head_dim = SHAPES[shape]
    windows = [None, CASES[case][3]]
    mine, _ = _batch(1, case, kv_heads, head_dim, dtype)
    theirs, layout = _batch(1, case, kv_heads, head_dim, dtype)
    q, k, v, cos, sin = _new_tokens(2, len(layout.kv_lens), heads, kv_heads, head_dim, dtype)
    kernel = CpuPagedAttention(mine, windows, heads, 0.3)
    reference = TorchPagedAttention(theirs, windows, heads, 0.3)
    slots = torch.tensor([t[(n - 1) // layout.block_size] * layout.block_size + (n - 1) % layout.block_size
                          for t, n in zip(layout.host_tables, layout.kv_lens)])
    plan, reference_plan = kernel.plan(layout), reference.plan(layout)
    outs = []
    for layer in (0, 1):
        q_rot, k_rot = (t[0] for t in apply_rotary_pos_emb(q[None], k[None], cos[None], sin[None], unsqueeze_dim=2))
        want = reference.attend(layer, q_rot, k_rot, v, slots, reference_plan)
        if portable:
            mine.write(layer, slots, k_rot, v)
            window = windows[layer]
            got = paged_decode(q_rot, mine.k[layer], mine.v[layer], plan.tables, plan.kv_lens, layout.block_size,
                               window, 0.3, plan.shared[window], portable=True)
        else:
            got = kernel.attend_unrotated(layer, q, k, v, cos, sin, plan)
        outs.append((got, want))
    return outs, mine, theirs


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_the_kernel_equals_the_torch_path(case, shape, dtype):
    outs, mine, theirs = _both(case, shape, dtype)
    for got, want in outs:
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    for a, b in zip((*mine.k, *mine.v), (*theirs.k, *theirs.v)):  # the rotated k and v, bit for bit
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", ["g3-d12", "g4-d64", "g6-d80"])
@pytest.mark.parametrize("case", ["bs16-shared-ragged", "bs16-window", "bs1-shared"])
def test_the_plain_loops_equal_the_torch_path(case, shape, dtype):
    outs, _, _ = _both(case, shape, dtype, portable=True)
    for got, want in outs:
        torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_result_does_not_depend_on_the_threads(dtype):
    """Tasks split the requests by thread count; each query's arithmetic stays the same."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs, mine, _ = _both("bs16-shared-ragged", "g4-d64", dtype)
            results.append([got for got, _ in outs])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_bad_tables_are_refused():
    pool, layout = _batch(1, "bs16-shared-ragged", 2, 12, torch.float32)
    kernel = CpuPagedAttention(pool, [None, None], 6, 0.3)
    plan = kernel.plan(layout)
    q = torch.randn(len(layout.kv_lens), 6, 12)
    args = (pool.k[0], pool.v[0])
    tables = plan.tables.clone()
    tables[1, 2] = pool.num_blocks
    with pytest.raises(ValueError, match="request 1: block id .* outside the pool"):
        paged_decode(q, *args, tables, plan.kv_lens, 16, None, 0.3)
    with pytest.raises(ValueError, match="request 2: its first shared blocks differ"):
        tables = plan.tables.clone()
        tables[2, 0] = tables[0, 2]
        paged_decode(q, *args, tables, plan.kv_lens, 16, None, 0.3, shared=32)
    with pytest.raises(ValueError, match="does not fit its block table"):
        paged_decode(q, *args, plan.tables[:, :2], plan.kv_lens, 16, None, 0.3)
    with pytest.raises(ValueError, match="shared must be a whole number of blocks"):
        paged_decode(q, *args, plan.tables, plan.kv_lens, 16, None, 0.3, shared=20)


def test_the_cpu_path_needs_a_cpu_model_in_fp32_or_bf16():
    pool = KVPool(KVShape(1, 2, 12, torch.float16), 4, 16)
    with pytest.raises(ValueError, match="attention='cpu' needs a CPU model in fp32 or bf16"):
        CpuPagedAttention(pool, [None], 6, 0.3)


# ---------------------------------------------------------------- the engine on the CPU kernel


@pytest.mark.parametrize("max_running", [1, 4])
def test_engine_greedy_on_the_cpu_kernel_equals_the_torch_path(tiny_loaded, max_running):
    from helpers.engine import random_prompts
    from helpers.paged import paged_engine

    from cai_fast.engine import SamplingParams

    prompts = random_prompts(4, 5, shared=37)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    want = [c.token_ids for c in paged_engine(tiny_loaded, "torch", max_running=max_running).generate(prompts, params)]
    engine = paged_engine(tiny_loaded, "cpu", max_running=max_running)
    assert isinstance(engine.runner.attention, CpuPagedAttention)
    assert [c.token_ids for c in engine.generate(prompts, params)] == want


def test_auto_takes_the_cpu_kernel_on_a_cpu(tiny_loaded):
    from helpers.paged import paged_engine

    assert isinstance(paged_engine(tiny_loaded, "auto").runner.attention, CpuPagedAttention)
    assert type(paged_engine(tiny_loaded, "torch").runner.attention) is TorchPagedAttention
