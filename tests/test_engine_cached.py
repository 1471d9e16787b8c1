"""The cached engine against transformers' own forward and generate, on tiny random models.

Scores must equal transformers' log-probs to float tolerance whatever the cache state, the batch
composition and the pool size (evictions included); greedy outputs must equal `generate`'s, or
diverge only at a step whose top-2 logits are within GREEDY_TIE_EPS (a near tie that float
rounding of another batch shape may flip). The references and helpers are in
helpers/engine.py, shared with test_engine_default_model.py and benches/bench_engine.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from cai_fast.engine import SamplingParams, make_generator
from cai_fast.engine.cached import EngineConfig, FailedCompletion, RequestTooLargeError
from cai_fast.engine.plain import PlainGenerator
from cai_fast.scheduler import BACKENDS, HAVE_CORE

from helpers.engine import (
    GREEDY_TIE_EPS,
    SCORE_ATOL,
    as_sequence,
    divergence,
    engine_for,
    random_prompts,
    reference_greedy,
    reference_logprobs,
)

SCHEDULERS = BACKENDS if HAVE_CORE else ("python",)


# ---------------------------------------------------------------- helpers of this file


def assert_scores_match(loaded, generator, prompts, continuations) -> None:
    got = generator.score_continuations(prompts, continuations)
    for prompt, cont, ours in zip(prompts, continuations, got):
        torch.testing.assert_close(ours, reference_logprobs(loaded.model, prompt, cont), atol=SCORE_ATOL, rtol=0)


def continuations_for(prompts, seed: int, vocab: int = 350) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in prompts]


# ---------------------------------------------------------------- scores


@pytest.mark.parametrize("backend", SCHEDULERS)
def test_scores_equal_transformers_with_cache_on_and_off(tiny_loaded, backend):
    prompts = random_prompts(0, 7)
    conts = continuations_for(prompts, 1)
    cached = engine_for(tiny_loaded, scheduler_backend=backend)
    assert_scores_match(tiny_loaded, cached, prompts, conts)
    first = cached.stats.prefill_computed
    assert_scores_match(tiny_loaded, cached, prompts, conts)  # now served from the cache
    # only each continuation and the partial block before it are computed again
    assert cached.stats.prefill_computed - first <= sum(len(c) + 3 for c in conts)
    uncached = engine_for(tiny_loaded, scheduler_backend=backend, prefix_cache=False)
    assert_scores_match(tiny_loaded, uncached, prompts, conts)
    assert uncached.stats.prefill_computed == uncached.stats.prefill_submitted


@pytest.mark.parametrize("config", [
    {"max_running": 1}, {"prefill_tokens": 8}, {"policy": "fcfs", "dedup_min_tokens": 0},
    {"policy": "dfs-weight", "block_size": 1}, {"block_size": 16, "max_running": 3},
], ids=["one-at-a-time", "tiny-budget", "fcfs-no-holdback", "dfs-block1", "block16"])
def test_scores_do_not_depend_on_batch_composition(tiny_loaded, config):
    prompts = random_prompts(2, 9)
    conts = continuations_for(prompts, 3)
    generator = engine_for(tiny_loaded, **config)
    assert_scores_match(tiny_loaded, generator, prompts[::-1], conts[::-1])
    assert_scores_match(tiny_loaded, generator, prompts[2:5], conts[2:5])


def test_scores_after_eviction_under_a_tiny_pool(tiny_loaded):
    prompts = random_prompts(4, 12, shared=17, lengths=(10, 30))
    conts = continuations_for(prompts, 5)
    generator = engine_for(tiny_loaded, pool_tokens=60)
    for _ in range(2):
        assert_scores_match(tiny_loaded, generator, prompts, conts)
    cache = generator.scheduler.cache
    cache.check_integrity()
    assert cache.total_size <= 60
    # the pool cannot hold every prompt, so the second pass recomputed some of them
    assert generator.stats.prefill_computed > generator.stats.prefill_submitted / 2


def test_score_options_match_the_plain_generator(tiny_loaded):
    prompts = random_prompts(6, 6)
    plain = PlainGenerator(tiny_loaded.model, tiny_loaded.tokenizer, batch_size=4)
    generator = engine_for(tiny_loaded)
    for options in ([[35], [36], [40]], [[35, 7], [36], [9, 9, 9]]):
        torch.testing.assert_close(generator.score_options(prompts, options), plain.score_options(prompts, options),
                                   atol=SCORE_ATOL, rtol=0)
    assert generator.score_options([], [[35]]).shape == (0, 1)


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("backend", SCHEDULERS)
def test_greedy_equals_generate_with_cache_on_and_off(tiny_loaded, backend):
    """Prompts share a prefix (the decode batch attends to it once), more prompts than running
    slots (continuous batching), a second call that hits the first call's cache."""
    prompts = random_prompts(7, 7)
    params = SamplingParams(max_new_tokens=14)
    references = [reference_greedy(tiny_loaded, p, 14) for p in prompts]
    cached = engine_for(tiny_loaded, scheduler_backend=backend, max_running=3)
    uncached = engine_for(tiny_loaded, scheduler_backend=backend, prefix_cache=False)
    runs = [cached.generate(prompts, params), cached.generate(prompts, params), uncached.generate(prompts, params)]
    for run in runs:
        for prompt, completion, reference in zip(prompts, run, references):
            divergence(tiny_loaded.model, prompt, as_sequence(completion), reference, GREEDY_TIE_EPS)
    assert cached.stats.decode_steps > 14  # 7 prompts through 3 slots took several waves


def test_bf16_greedy_equals_bf16_generate_but_at_near_ties(tiny_model_path):
    """In bf16 (the default on AMX CPUs) the engine (cache on and off) against transformers'
    generate in bf16: sequences may part only where the top-2 logits are within bf16 rounding."""
    from cai_fast.engine import load_model

    loaded = load_model(str(tiny_model_path), dtype="bfloat16")
    with torch.no_grad():  # sharpen, so that most steps are far from a tie
        loaded.model.get_output_embeddings().weight.mul_(8)
    prompts = random_prompts(13, 6)
    params = SamplingParams(max_new_tokens=10)
    references = [reference_greedy(loaded, p, 10) for p in prompts]
    parted = []
    for config in ({}, {"prefix_cache": False}):
        for prompt, completion, reference in zip(prompts, engine_for(loaded, **config).generate(prompts, params),
                                                 references):
            parted.append(divergence(loaded.model, prompt, as_sequence(completion), reference, eps=0.25))
    assert sum(p is not None for p in parted) <= len(parted) // 2


def test_compiled_decode_step_equals_the_eager_one(tiny_loaded):
    """The decode step through torch.compile (dynamo with the eager backend here: the graph, the
    bucket padding and the opaque attention op are what is tested; inductor takes minutes on a
    CPU) against the eager step: same hidden states, so the same greedy tokens, at batch sizes that
    are buckets and that are padded up to one (3 -> 4, 5 -> 8, then fewer as requests finish)."""
    prompts = random_prompts(11, 5)
    params = SamplingParams(max_new_tokens=9)
    eager = engine_for(tiny_loaded, max_running=5).generate(prompts, params)
    compiled_engine = engine_for(tiny_loaded, max_running=5, compile="eager")
    calls = []
    step = compiled_engine.runner.compiled.fn
    compiled_engine.runner.compiled.fn = lambda *a: calls.append(len(a[0])) or step(*a)
    compiled = compiled_engine.generate(prompts, params) + compiled_engine.generate(prompts[:3], params)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager + eager[:3]]
    assert set(calls) <= {1, 2, 4, 8} and {4, 8} <= set(calls)


def test_greedy_with_end_of_turn_matches_plain_generator(tiny_loaded, tiny_model_path):
    """A copy of the tiny model whose end-of-turn logit shadows a frequent token, so completions
    end on it at different steps."""
    from cai_fast.engine import load_model

    loaded = load_model(str(tiny_model_path), dtype="float32")
    prompts = random_prompts(8, 6)
    first = [c.token_ids for c in engine_for(loaded).generate(prompts, SamplingParams(max_new_tokens=12))]
    frequent = max(set(sum(first, [])), key=sum(first, []).count)
    head = loaded.model.get_output_embeddings().weight
    with torch.no_grad():
        head[loaded.tokenizer.eos_token_id] = head[frequent] * 1.05
    params = SamplingParams(max_new_tokens=12)
    ours = engine_for(loaded).generate(prompts, params)
    theirs = PlainGenerator(loaded.model, loaded.tokenizer).generate(prompts, params)
    assert any(c.finish_reason == "stop" for c in ours)
    for prompt, a, b in zip(prompts, ours, theirs):
        if divergence(loaded.model, prompt, as_sequence(a), as_sequence(b), GREEDY_TIE_EPS) is None:
            assert (a.text, a.finish_reason) == (b.text, b.finish_reason)


def test_sampling_does_not_depend_on_batch_composition(tiny_loaded):
    prompts = random_prompts(9, 6)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5)
    texts = lambda out: [c.token_ids for c in out]  # noqa: E731
    together = texts(engine_for(tiny_loaded).generate(prompts, params))
    assert texts(engine_for(tiny_loaded, max_running=1, prefill_tokens=8).generate(prompts, params)) == together
    warm = engine_for(tiny_loaded)
    warm.generate(prompts[::-1], params)
    assert texts(warm.generate(prompts, params)) == together
    others = random_prompts(10, 6)
    mixed = [p if i % 2 else o for i, (p, o) in enumerate(zip(prompts, others))]
    assert texts(engine_for(tiny_loaded).generate(mixed, params))[1::2] == together[1::2]
    assert texts(engine_for(tiny_loaded).generate(prompts, SamplingParams(10, 0.9, 0.9, seed=6))) != together


def test_stop_strings_cut_the_completion(tiny_loaded):
    prompts = random_prompts(11, 3)
    tokenizer = tiny_loaded.tokenizer
    free = engine_for(tiny_loaded).generate(prompts, SamplingParams(max_new_tokens=16))
    text = tokenizer.decode(free[0].token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {text!r}"
    params = SamplingParams(max_new_tokens=16, stop=(stop,))
    ours = engine_for(tiny_loaded).generate(prompts, params)
    assert ours[0].finish_reason == "stop"
    assert ours[0].text == text[: text.index(stop)].strip()
    assert len(ours[0].token_ids) < len(free[0].token_ids)
    assert stop in tokenizer.decode(ours[0].token_ids) and stop not in tokenizer.decode(ours[0].token_ids[:-1])
    plain = PlainGenerator(tiny_loaded.model, tiny_loaded.tokenizer).generate(prompts, params)
    assert [(c.text, c.finish_reason) for c in ours] == [(c.text, c.finish_reason) for c in plain]


# ---------------------------------------------------------------- memory bound, failures, fallbacks


def test_a_request_too_big_for_the_pool_fails_alone(tiny_loaded):
    prompts = random_prompts(12, 3)
    huge = random_prompts(13, 1, shared=70)[0]
    params = SamplingParams(max_new_tokens=6)
    generator = engine_for(tiny_loaded, pool_tokens=64)
    with pytest.warns(UserWarning, match="request 1 of the call failed"):
        out = generator.generate([prompts[0], huge, prompts[1]], params)
    assert isinstance(out[1], FailedCompletion) and out[1].finish_reason == "error"
    assert "needs" in out[1].error and "pool" in out[1].error and out[1].text == ""
    alone = engine_for(tiny_loaded).generate([prompts[0], prompts[1]], params)
    assert [c.token_ids for c in (out[0], out[2])] == [c.token_ids for c in alone]
    assert generator.stats.failed == 1
    with pytest.raises(RequestTooLargeError, match=r"prompt 1 \("):
        generator.score_options([prompts[0], huge], [[35]])
    assert generator.scheduler.num_running == 0 and generator.scheduler.num_waiting == 0


def test_an_interrupted_call_leaves_the_engine_usable(tiny_loaded, monkeypatch):
    generator = engine_for(tiny_loaded)
    prompts = random_prompts(14, 4)
    forward = generator.runner.forward
    calls = iter(range(100))

    def failing(batch):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return forward(batch)

    monkeypatch.setattr(generator.runner, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        generator.generate(prompts, SamplingParams(max_new_tokens=5))
    assert generator.scheduler.num_running == 0 and generator.scheduler.num_waiting == 0
    generator.scheduler.cache.check_integrity()
    assert_scores_match(tiny_loaded, generator, prompts, continuations_for(prompts, 15))


def _tiny(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(vocab_size=350, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)
    model = model_cls(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.2)  # Qwen2's q/k/v biases start at zero; make them count
    return model


def _architectures():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    return {
        "qwen2-biases-sliding": lambda: _tiny(Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True,
                                              sliding_window=9, max_window_layers=1),
        "mistral-sliding": lambda: _tiny(MistralConfig, MistralForCausalLM, sliding_window=11),
        # a window no context reaches: the kernels share the prefix's keys as without one
        "mistral-wide-window": lambda: _tiny(MistralConfig, MistralForCausalLM, sliding_window=4096),
    }


@pytest.mark.parametrize("arch", ["qwen2-biases-sliding", "mistral-sliding", "mistral-wide-window"])
def test_other_llama_family_architectures(tiny_loaded, arch):
    from cai_fast.engine import LoadedModel

    model = _architectures()[arch]()
    loaded = LoadedModel(model, tiny_loaded.tokenizer, arch)
    prompts = random_prompts(16, 4, shared=15, lengths=(5, 20))
    generator = engine_for(loaded)
    assert_scores_match(loaded, generator, prompts, continuations_for(prompts, 17))
    out = generator.generate(prompts, SamplingParams(max_new_tokens=10))
    for prompt, completion in zip(prompts, out):
        divergence(model, prompt, as_sequence(completion), reference_greedy(loaded, prompt, 10), GREEDY_TIE_EPS)


def test_gpt2_runs_on_the_generic_path(tiny_loaded):
    """Learned absolute positions, fused c_attn: the generic runner runs it as generate does
    (families with rotary embeddings: tests/test_engine_generic.py)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from cai_fast.engine import LoadedModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=350, n_embd=32, n_layer=2, n_head=2)).eval()
    loaded = LoadedModel(model, tiny_loaded.tokenizer, "gpt2")
    generator = make_generator(loaded, engine="cached")
    assert type(generator.runner).__name__ == "GenericRunner"
    prompts = random_prompts(19, 3, shared=9, lengths=(2, 12))
    assert_scores_match(loaded, generator, prompts, continuations_for(prompts, 20))


def test_stats_and_config_errors(tiny_loaded):
    generator = engine_for(tiny_loaded)
    prompts = random_prompts(18, 5, shared=40)
    generator.generate(prompts, SamplingParams(max_new_tokens=4))
    stats = generator.stats
    assert stats.prefill_submitted == sum(map(len, prompts))
    assert stats.prefill_computed < stats.prefill_submitted - 3 * 40  # the shared prefix was computed once
    assert 0 < stats.cache_hit_rate < 1 and stats.generated_tokens == stats.decode_tokens + len(prompts)
    summary = stats.summary()
    batches = stats.prefill_batches + stats.decode_steps
    assert summary["model_seconds"] > 0 and stats.scheduler_seconds > 0 and batches >= 5
    assert summary["scheduler_ms_per_batch"] == round(1000 * stats.scheduler_seconds / batches, 3)
    assert summary["kernels"] == generator.runner.kernels.as_dict()
    with pytest.raises(ValueError, match="max_running"):
        EngineConfig(max_running=0)
    with pytest.raises(ValueError, match="less than one block"):
        EngineConfig(pool_tokens=3, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        generator.generate([[]], SamplingParams())


@pytest.mark.parametrize("config", [{}, {"attention": "torch"}, {"fused": False}, {"compile": "eager"}])
def test_the_kernel_record_says_what_a_step_runs(tiny_loaded, monkeypatch, config):
    """Each part the record names a kernel for runs that kernel, and only then."""
    from cai_fast.engine import rows
    from cai_fast.engine.attention import CpuPagedAttention

    generator = engine_for(tiny_loaded, max_running=4, **config)
    kernels = generator.runner.kernels
    calls = {"norm": 0, "mlp": 0, "rotary": 0}

    def counted(part, fn):
        def call(*args, **kwargs):
            calls[part] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(rows, "add_rms_norm", counted("norm", rows.add_rms_norm))
    monkeypatch.setattr(rows, "silu_mul", counted("mlp", rows.silu_mul))
    monkeypatch.setattr(CpuPagedAttention, "attend_unrotated", counted("rotary", CpuPagedAttention.attend_unrotated))
    generator.generate(random_prompts(4, 4), SamplingParams(max_new_tokens=5))
    assert (calls["norm"] > 0) == kernels.norm.startswith("rows.add_rms_norm")
    assert (calls["mlp"] > 0) == kernels.mlp.startswith("rows.silu_mul")
    assert (calls["rotary"] > 0) == ("rotary" in kernels.attention)
    assert kernels.attention.startswith(generator.runner.attention.name)
    assert ("torch.compile" in kernels.loop) == ("compile" in config)
    if config.get("fused") is False:
        assert (kernels.linear, kernels.norm, kernels.mlp) == ("the model's modules",) * 3
