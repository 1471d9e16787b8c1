"""The Triton paged-attention kernel (cai_fast.engine.attention.triton_kernel) against the torch path, under
TRITON_INTERPRET=1 on CPU: block sizes 1, 16 and 256, ragged lengths, shared prefixes (the decode
cascade), prefill over a cached prefix, a sliding window, key splits, a GQA group of 3 and an odd
head dim; then the engine on that path (greedy equal to the torch path's) and its decode step,
which reads one thing back from the device: the sampled tokens."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from cai_fast.engine.attention import HAVE_TRITON, BatchLayout, TorchPagedAttention
from cai_fast.engine.kv import KVPool, KVShape, slot_ids

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

SHAPE = KVShape(2, 2, 12, torch.float32)  # 6 query heads: a group of 3; head dim 12 (padded to 16)
HEADS, SCALE = 6, 0.29


def _batch(seed: int, kv_lens, q_lens, shared_blocks: int, block_size: int, device="cpu", dtype=torch.float32,
           shape: KVShape = SHAPE):
    """A pool of random K/V (NaN in blocks nobody owns) and tables sharing their first blocks.
    (benches/gpu_check.py runs the same cases on CUDA, in bf16 and fp32; tests/test_cpu_decode_kernel.py
    other shapes.)"""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in kv_lens) + 3
    pool = KVPool(dataclasses.replace(shape, dtype=dtype), num_blocks, block_size, device)
    for cache in (*pool.k, *pool.v):
        cache.copy_(torch.randn(cache.shape, generator=gen))
    free = torch.randperm(num_blocks, generator=gen)
    shared, rest = free[:shared_blocks], free[shared_blocks:]
    tables = []
    for length in kv_lens:
        own = -(-length // block_size) - shared_blocks
        tables.append(torch.cat([shared, rest[:own]]).to(device))
        rest = rest[own:]
    for cache in (*pool.k, *pool.v):
        cache.view(num_blocks, block_size, -1)[rest] = float("nan")
    return pool, BatchLayout(list(q_lens), list(kv_lens), tables, block_size)


CASES = {  # block size, context lengths, new tokens, shared leading blocks, window of layer 1
    "bs1-decode-shared": (1, (5, 9, 3), (1, 1, 1), 2, None),
    "bs16-decode-shared-ragged": (16, (37, 70, 49, 33), (1, 1, 1, 1), 2, None),
    "bs16-decode-window": (16, (37, 70, 49), (1, 1, 1), 2, 21),
    "bs16-prefill-cached-prefix": (16, (40, 33, 7), (5, 33, 2), 0, None),
    "bs16-prefill-window": (16, (40, 53), (19, 30), 1, 11),
    "bs256-decode-shared": (256, (300, 290), (1, 1), 1, None),
    "bs256-prefill": (256, (261, 20), (9, 20), 0, None),
}


def both_paths(case: str, num_splits: int, device="cpu", dtype=torch.float32):
    """(Triton, torch) outputs of each layer of CASES[case] (benches/gpu_check.py calls it on CUDA)."""
    from cai_fast.engine.attention.triton_kernel import TritonPagedAttention

    block_size, kv_lens, q_lens, shared, window = CASES[case]
    pool, layout = _batch(1, kv_lens, q_lens, shared, block_size, device, dtype)
    reference = TorchPagedAttention(pool, [None, window], HEADS, SCALE)
    triton_path = TritonPagedAttention(pool, [None, window], HEADS, SCALE, num_splits=num_splits)
    plan = triton_path.plan(layout)
    if shared and window is None and all(n == 1 for n in q_lens):
        assert plan[None][1] is not None  # the shared blocks go through the cascade launch
    gen = torch.Generator().manual_seed(2)
    total = sum(q_lens)
    q = torch.randn(total, HEADS, SHAPE.head_dim, generator=gen).to(device, dtype)
    k_new, v_new = (torch.randn(total, 2, SHAPE.head_dim, generator=gen).to(device, dtype) for _ in range(2))
    write = torch.cat([slot_ids(t, n - m, n, block_size) for t, n, m in zip(layout.tables, kv_lens, q_lens)])
    return [(triton_path.attend(layer, q, k_new, v_new, write, plan),
             reference.attend(layer, q, k_new, v_new, write, reference.plan(layout))) for layer in (0, 1)]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_triton_paged_attention_equals_the_torch_path(case, num_splits):
    for got, want in both_paths(case, num_splits):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_merge_splits_ignores_parts_that_saw_no_key():
    from cai_fast.engine.attention.triton_kernel import merge_splits

    out = torch.randn(2, 3, 4, 5)
    lse = torch.randn(2, 3, 4)
    lse[1, 0] = float("-inf")
    merged, total = merge_splits(out, lse)
    torch.testing.assert_close(merged[0], out[0, 0])
    torch.testing.assert_close(total[1:], torch.logaddexp(lse[0, 1:], lse[1, 1:]))


# ---------------------------------------------------------------- the engine on the Triton path


def _engine(loaded, attention, **config):
    from cai_fast.engine.cached import CachedGenerator, EngineConfig

    settings = {"block_size": 16, "pool_tokens": 2048, "dedup_min_tokens": 8, "attention": attention, **config}
    return CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(**settings))


def test_engine_greedy_on_the_triton_path_equals_the_torch_path(tiny_loaded):
    from test_engine_cached import random_prompts

    from cai_fast.engine import SamplingParams

    prompts = random_prompts(4, 5, shared=37)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    want = [c.token_ids for c in _engine(tiny_loaded, "torch").generate(prompts, params)]
    got = [c.token_ids for c in _engine(tiny_loaded, "triton").generate(prompts, params)]
    assert got == want


class _DeviceReads(torch.overrides.TorchFunctionMode):
    """Counts the calls made from cai_fast's code that read a tensor's values into Python: on CUDA
    each one waits for the device (a host sync)."""

    READS = frozenset({torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.Tensor.cpu,
             torch.Tensor.numpy, torch.nonzero})

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            caller = sys._getframe(1)
            if "cai_fast" in caller.f_code.co_filename and "paged_kernel" not in caller.f_code.co_filename:
                self.where.append(f"{caller.f_code.co_name}:{caller.f_lineno} {func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_a_decode_step_reads_back_only_the_sampled_tokens(tiny_loaded, temperature):
    from cai_fast.engine import SamplingParams

    engine = _engine(tiny_loaded, "triton")
    steps = []
    real_step = engine._decode_step

    def counted(running):
        with _DeviceReads() as reads:
            real_step(running)
        steps.append(reads.where)

    engine._decode_step = counted
    from test_engine_cached import random_prompts

    params = SamplingParams(max_new_tokens=4, temperature=temperature, top_p=0.9, seed=3)
    engine.generate(random_prompts(5, 4, shared=40), params)
    assert steps and all(len(where) == 1 and "tolist" in where[0] for where in steps), steps


def test_the_kv_block_size_reaches_the_engine_from_the_command_line(tiny_model_path):
    import argparse

    from cai_fast.cli import add_dataclass_options, load_generator
    from cai_fast.config import ModelOptions

    parser = argparse.ArgumentParser()
    add_dataclass_options(parser, ModelOptions)
    args = parser.parse_args(["--model", str(tiny_model_path), "--kv-block-size", "7"])
    engine = load_generator(args, batch_size=4)
    assert engine.config.block_size == 7 and engine.pool.block_size == 7
