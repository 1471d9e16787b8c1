"""Random paged K/V batches and the cases on which attention backends are held to the torch path
(tests/test_engine_paged_kernel.py, tests/test_cpu_decode_kernel.py, benches/gpu_check.py on CUDA)."""

from __future__ import annotations

import dataclasses

import torch

from cai_fast.engine.attention import BatchLayout, TorchPagedAttention
from cai_fast.engine.cached import CachedGenerator, EngineConfig
from cai_fast.engine.kv import KVPool, KVShape, slot_ids

SHAPE = KVShape(2, 2, 12, torch.float32)  # 6 query heads: a group of 3; head dim 12 (padded to 16)
HEADS, SCALE = 6, 0.29


def paged_batch(seed: int, kv_lens, q_lens, shared_blocks: int, block_size: int, device="cpu", dtype=torch.float32,
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
    pool, layout = paged_batch(1, kv_lens, q_lens, shared, block_size, device, dtype)
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


def paged_engine(loaded, attention, **config):
    settings = {"block_size": 16, "pool_tokens": 2048, "dedup_min_tokens": 8, "attention": attention, **config}
    return CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(**settings))
