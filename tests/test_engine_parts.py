"""The engine's parts on their own: pool slots, paged attention against dense attention, sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cai_fast.engine.attention as attention_module
import cai_fast.engine.attention.reference as reference_module
from cai_fast.engine.attention import (HAVE_CPU_KERNEL, BatchLayout, CpuPagedAttention, FlashPagedAttention,
                                       TorchPagedAttention, attend_with_lse, attention_with_lse,
                                       make_attention, visible)
from cai_fast.engine.base import SamplingParams
from cai_fast.engine.kv import KVPool, KVShape, pool_blocks, slot_ids
from cai_fast.engine.sampling import next_tokens, request_generator, top_p_filter

SHAPE = KVShape(layers=2, kv_heads=2, head_dim=8, dtype=torch.float32)


def test_slot_ids_follow_the_block_table():
    table = torch.tensor([7, 2, 9, 4])
    assert slot_ids(table, 0, 13, 4).tolist() == [28, 29, 30, 31, 8, 9, 10, 11, 36, 37, 38, 39, 16]
    assert slot_ids(table, 5, 10, 4).tolist() == [9, 10, 11, 36, 37]
    assert slot_ids(table, 3, 3, 4).tolist() == []


def test_pool_gathers_whole_blocks_and_clears_them():
    pool = KVPool(SHAPE, 6, 4)
    for cache in (*pool.k, *pool.v):
        cache.normal_()
    k, v = pool.gather(1, torch.tensor([4, 1]))
    assert k.shape == (8, 2, 8)
    torch.testing.assert_close(k, torch.cat([pool.k[1][16:20], pool.k[1][4:8]]))
    pool.write(1, torch.tensor([5, 17]), k[:2] + 1, v[:2] + 1)
    torch.testing.assert_close(pool.k[1][[5, 17]], k[:2] + 1)
    pool.clear(torch.tensor([1]))
    assert not pool.v[0][4:8].any() and pool.v[0][8:].all()


def test_pool_size_from_tokens_or_bytes():
    assert SHAPE.bytes_per_token == 2 * 2 * 2 * 8 * 4
    assert pool_blocks(SHAPE, 16, 100, 0) == 6
    assert pool_blocks(SHAPE, 16, None, 256 * 64) == 4
    with pytest.raises(ValueError, match="no whole block"):
        pool_blocks(SHAPE, 16, None, 100)


def _dense(q, k, v, q_pos, k_pos, window, scale):
    """Plain attention of q [n, heads, d] over k, v [L, kv_heads, d], keys repeated per group."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->hnl", q, k) * scale
    scores = scores.masked_fill(~visible(q_pos, k_pos, window), float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def _paged_batch(seed: int, kv_lens, q_lens, shared_blocks: int, block_size: int = 4, dtype=torch.float32,
                 blocks: int = 64):
    """A pool with random K/V and B requests whose block tables share their first blocks."""
    gen = torch.Generator().manual_seed(seed)
    pool = KVPool(dataclasses.replace(SHAPE, dtype=dtype), blocks, block_size)
    for layer in range(SHAPE.layers):
        pool.k[layer].normal_(generator=gen)
        pool.v[layer].normal_(generator=gen)
    free = torch.randperm(blocks, generator=gen)
    shared, rest = free[:shared_blocks], free[shared_blocks:]
    tables = []
    for length in kv_lens:
        own = -(-length // block_size) - shared_blocks
        tables.append(torch.cat([shared, rest[:own]]))
        rest = rest[own:]
    for layer in range(SHAPE.layers):  # blocks no request owns are never read (the real pool is uninitialised)
        for cache in (pool.k, pool.v):
            cache[layer].view(blocks, block_size, -1)[rest] = float("nan")
    return pool, BatchLayout(list(q_lens), list(kv_lens), tables, block_size)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("q_lens, kv_lens, shared", [
    ((1, 1, 1), (13, 22, 17), 3), ((3, 1, 7), (13, 22, 17), 2), ((13, 2, 17), (13, 22, 17), 0),
    ((3, 1, 5, 4), (15, 22, 17, 16), 3), ((9, 1, 1), (13, 22, 17), 1)],
    ids=["decode", "prefill", "prefill-uncached", "prefill-same-context", "prefill-1-and-9"])
def test_paged_attention_equals_dense_attention(window, q_lens, kv_lens, shared):
    # shared blocks end before every request's new tokens: in the engine a block is written once;
    # in prefill-same-context, three requests come after the same 12 cached tokens
    pool, layout = _paged_batch(0, kv_lens, q_lens, shared_blocks=shared)
    heads, scale = 4, 0.3
    attention = TorchPagedAttention(pool, [None, window], heads, scale)
    plan = attention.plan(layout)
    if q_lens == (1, 1, 1):
        assert plan.shared[None][0] == 12  # three shared blocks, attended once for the batch
    total = sum(q_lens)
    q = torch.randn(total, heads, 8)
    k_new, v_new = torch.randn(total, 2, 8), torch.randn(total, 2, 8)
    write = torch.cat([slot_ids(t, n - m, n, 4) for t, n, m in zip(layout.tables, kv_lens, q_lens)])
    for layer in (0, 1):
        out = attention.attend(layer, q, k_new, v_new, write, plan)
        start = 0
        for table, n, m in zip(layout.tables, kv_lens, q_lens):
            k, v = (t[:n] for t in pool.gather(layer, table[: -(-n // 4)]))
            want = _dense(q[start : start + m], k, v, torch.arange(n - m, n), torch.arange(n), attention.windows[layer], scale)
            torch.testing.assert_close(out[start : start + m], want, atol=1e-5, rtol=1e-5)
            start += m


@pytest.mark.skipif(not attention_module.HAVE_CPU_KERNEL, reason="needs cai_fast._core (pip install .)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_attends_the_same_whatever_its_batch(dtype):
    """On the CPU kernel path, bit for bit: whatever else is in the batch, however much of its request
    was cached, and whether it comes in a prefill or a decode batch (a resumed labelling run batches
    and caches its requests otherwise than the uninterrupted one). The contexts run past the kernel's
    64-key chunks, and 80 shared tokens are not a whole number of chunks."""
    kv_lens, q_lens = (150, 97, 131, 90), (9, 6, 40, 4)
    pool, layout = _paged_batch(2, kv_lens, q_lens, shared_blocks=20, dtype=dtype, blocks=96)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(sum(q_lens), 4, 8, generator=gen).to(dtype)
    k_new, v_new = (torch.randn(sum(q_lens), 2, 8, generator=gen).to(dtype) for _ in range(2))
    attention = CpuPagedAttention(pool, [None, None], 4, 0.3)
    write = torch.cat([slot_ids(t, n - m, n, 4) for t, n, m in zip(layout.tables, kv_lens, q_lens)])
    whole = attention.attend(0, q, k_new, v_new, write, attention.plan(layout))
    ends = torch.tensor(q_lens).cumsum(0)
    starts = ends - torch.tensor(q_lens)
    for r, (n, length, table) in enumerate(zip(q_lens, kv_lens, layout.tables)):
        for cached in (0, 1, n - 1):  # its first new tokens came in an earlier batch
            rows = slice(starts[r] + cached, ends[r])
            alone = BatchLayout([n - cached], [length], [table], 4)
            out = attention.attend(0, q[rows], k_new[rows], v_new[rows], write[rows], attention.plan(alone))
            assert torch.equal(out, whole[rows]), (r, cached)
    last = ends - 1  # every request's last token, decoded: together, then alone
    together = BatchLayout([1] * 4, list(kv_lens), layout.tables, 4)
    out = attention.attend(0, q[last], k_new[last], v_new[last], write[last], attention.plan(together))
    assert torch.equal(out, whole[last])
    for r, row in enumerate(last.tolist()):
        alone = BatchLayout([1], [kv_lens[r]], [layout.tables[r]], 4)
        out = attention.attend(0, q[[row]], k_new[[row]], v_new[[row]], write[[row]], attention.plan(alone))
        assert torch.equal(out, whole[[row]]), r


@pytest.mark.parametrize("headroom", [0, 4])
def test_kept_decode_rows_equal_dense_attention_step_after_step(monkeypatch, headroom):
    """Decode steps over the same rows write into the kept rest instead of gathering it; a row
    outgrowing the headroom, or a changed set of rows, gathers it anew. Every step equals dense
    attention over the pool."""
    monkeypatch.setattr(reference_module, "REST_HEADROOM", headroom)
    block_size, shared, steps = 4, 2, 9
    kv_lens = [10, 17, 13]
    pool, layout = _paged_batch(4, [n + steps for n in kv_lens], (1, 1, 1), shared_blocks=shared)
    tables = layout.tables  # room for every step's token
    attention = TorchPagedAttention(pool, [None, None], 4, 0.3)
    gen = torch.Generator().manual_seed(5)
    kept = []
    for step in range(steps):
        if step == 6:  # a row leaves: the rest is gathered anew for the two left
            kv_lens, tables = kv_lens[:2], tables[:2]
        kv_lens = [n + 1 for n in kv_lens]
        batch = BatchLayout([1] * len(kv_lens), list(kv_lens), tables, block_size)
        plan = attention.plan(batch)
        kept.append(plan.kept)
        q = torch.randn(len(kv_lens), 4, 8, generator=gen)
        k_new, v_new = torch.randn(len(kv_lens), 2, 8, generator=gen), torch.randn(len(kv_lens), 2, 8, generator=gen)
        write = torch.cat([slot_ids(t, n - 1, n, block_size) for t, n in zip(tables, kv_lens)])
        for layer in (0, 1):
            out = attention.attend(layer, q, k_new, v_new, write, plan)
            for r, (table, n) in enumerate(zip(tables, kv_lens)):
                k, v = (t[:n] for t in pool.gather(layer, table[: -(-n // block_size)]))
                want = _dense(q[r : r + 1], k, v, torch.tensor([n - 1]), torch.arange(n), None, 0.3)
                torch.testing.assert_close(out[r : r + 1], want, atol=1e-5, rtol=1e-5)
    assert all(k is not None for k in kept)
    assert kept[1] is kept[0] and kept[6] is not kept[5]  # kept between steps; the new rows gathered anew
    # 4 blocks of headroom last the 9 steps; with none a row entering a new block gathers them anew
    assert len({id(k) for k in kept}) == 2 if headroom == 4 else len({id(k) for k in kept}) > 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_with_lse_equals_the_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    batch, heads, group, d, n = 5, 3, 3, 24, 37  # odd shapes; some keys of every row masked
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for shape in
               ((batch, heads, group, d), (batch, n, heads, d), (batch, n, heads, d)))
    mask = torch.rand(batch, 1, n, generator=gen) > 0.3
    mask[:, :, 0] = True
    bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    out, lse = attention_with_lse(q, k, v, mask, bias, 0.2)
    want, want_lse = attend_with_lse(q.float(), k.float(), v.float(), mask, 0.2)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)


def test_the_shared_keys_are_kept_until_forgotten():
    pool, layout = _paged_batch(1, (9, 14), (1, 1), shared_blocks=2)
    attention = TorchPagedAttention(pool, [None, None], 4, 0.5)
    plan = attention.plan(layout)
    shared_blocks = plan.shared[None][1]
    first, _ = attention._shared_kv(0, shared_blocks)
    pool.k[0].add_(1.0)  # as if the blocks were handed out again and rewritten
    assert attention._shared_kv(0, shared_blocks)[0] is first
    attention.forget_shared()
    torch.testing.assert_close(attention._shared_kv(0, shared_blocks)[0], first + 1.0)


def test_top_p_keeps_the_nucleus_like_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(5, 50) * 3
    for top_p in (0.3, 0.8, 0.95):
        theirs = TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf")
        ours = torch.stack([top_p_filter(row.softmax(-1), top_p) > 0 for row in logits])
        assert torch.equal(ours, theirs)


def test_next_tokens_greedy_rows_and_seeded_draws():
    logits = torch.randn(3, 40)
    greedy, sampled = SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    gens = [request_generator(3, i) for i in range(3)]
    tokens = next_tokens(logits, [greedy, sampled, sampled], gens)
    assert tokens[0] == int(logits[0].argmax())
    again = next_tokens(logits, [greedy, sampled, sampled], [request_generator(3, i) for i in range(3)])
    assert again == tokens
    draws = {tuple(next_tokens(logits[1:2], [sampled], [request_generator(3, i)])) for i in range(20)}
    assert len(draws) > 1  # different requests draw differently


def test_attention_choice_falls_back_to_torch_where_flash_attn_cannot_run():
    pool = KVPool(SHAPE, 4, 4)
    auto = CpuPagedAttention if HAVE_CPU_KERNEL else TorchPagedAttention  # fp32 on the CPU
    assert type(make_attention("auto", pool, [None, None], 4, 0.5)) is auto
    assert type(make_attention("torch", pool, [None, None], 4, 0.5)) is TorchPagedAttention
    with pytest.raises(ValueError, match="needs flash-attn"):
        make_attention("flash", pool, [None, None], 4, 0.5)
    with pytest.raises(ValueError, match="unknown attention"):
        make_attention("fast", pool, [None, None], 4, 0.5)


def test_a_backend_that_does_not_rotate_refuses_unrotated_input():
    torch_path = make_attention("torch", KVPool(SHAPE, 4, 4), [None, None], 4, 0.5)
    layout = BatchLayout([1], [3], [torch.tensor([0])], 4)
    plan = torch_path.plan(layout)
    assert not torch_path.rotates(plan)
    q, k = torch.randn(1, 4, 8), torch.randn(1, 2, 8)
    with pytest.raises(RuntimeError, match="torch attention does not apply the rotary embedding"):
        torch_path.attend_unrotated(0, q, k, k.clone(), torch.randn(1, 8), torch.randn(1, 8), plan)


def test_auto_attention_never_chooses_flash(monkeypatch):
    """Even where flash-attn could run (here faked: installed, a CUDA-looking pool in bf16, blocks
    of 256), "auto" leaves it alone: no test holds flash to the torch path yet."""
    monkeypatch.setattr(attention_module, "HAVE_FLASH_ATTN", True)
    monkeypatch.setattr(attention_module, "HAVE_TRITON", False)
    pool = KVPool(KVShape(2, 2, 8, torch.bfloat16), 2, 256, "cpu")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    chosen = make_attention("auto", pool, [None, None], 4, 0.5)
    assert type(chosen) is not FlashPagedAttention
    with pytest.raises(ModuleNotFoundError, match="flash_attn"):  # explicit 'flash' still goes there
        make_attention("flash", pool, [None, None], 4, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections_equal_the_model_modules(tiny_loaded, dtype):
    import copy

    from cai_fast.engine.model_runner import LayerProjections

    layer = copy.deepcopy(tiny_loaded.model.get_decoder().layers[1]).to(dtype)
    layer.self_attn.k_proj.bias = torch.nn.Parameter(torch.randn(layer.self_attn.k_proj.out_features).to(dtype))
    fused, plain = LayerProjections.fused(layer), LayerProjections.of_modules(layer)
    h = torch.randn(7, layer.self_attn.q_proj.in_features).to(dtype)  # 7 rows: not a power of two
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    with torch.inference_mode():
        for name in ("qkv", "o", "mlp"):
            x = h if name != "o" else torch.randn(7, layer.self_attn.o_proj.in_features).to(dtype)
            got, want = getattr(fused, name)(x), getattr(plain, name)(x)
            torch.testing.assert_close(torch.cat(got, -1) if name == "qkv" else got,
                                       torch.cat(want, -1) if name == "qkv" else want, **tol)


def test_a_wrapped_projection_is_called_as_the_module(tiny_loaded):
    import copy

    from cai_fast.engine.model_runner import LayerProjections

    layer = copy.deepcopy(tiny_loaded.model.get_decoder().layers[0])
    calls = []
    layer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    wrapped = torch.nn.Sequential(layer.self_attn.v_proj)  # as peft wraps a LoRA target
    layer.self_attn.v_proj = wrapped
    LayerProjections.fused(layer).qkv(torch.randn(3, wrapped[0].in_features))
    assert calls == [1]


def test_the_cpu_paths_are_forced_from_the_environment(monkeypatch):
    from cai_fast.engine import cpu_paths

    monkeypatch.delenv("CAI_FAST_CPU", raising=False)
    assert cpu_paths.amx_allowed() and not cpu_paths.portable() and cpu_paths.portable(True)
    monkeypatch.setenv("CAI_FAST_CPU", "avx512")
    assert not cpu_paths.amx_allowed() and not cpu_paths.portable()
    monkeypatch.setenv("CAI_FAST_CPU", "portable")
    assert not cpu_paths.amx_allowed() and cpu_paths.portable() and not cpu_paths.portable(False)
    monkeypatch.setenv("CAI_FAST_CPU", "sse")
    with pytest.raises(ValueError, match="CAI_FAST_CPU='sse'; use one of auto, avx512, portable"):
        cpu_paths.forced()
