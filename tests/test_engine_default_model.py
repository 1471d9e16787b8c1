"""The cached engine on the real default model (SmolLM2-135M-Instruct, 30 layers): a few short
chat prompts, scores against transformers' forward and greedy outputs against its generate.
How rare near-tie divergences are over many prompts is measured in benches/bench_engine.py."""

from __future__ import annotations

import torch

from cai_fast.data import prompts as P
from cai_fast.engine import SamplingParams

from helpers.engine import (
    as_sequence,
    divergence,
    engine_for,
    reference_greedy,
    reference_logprobs,
)


SCORE_ATOL = 2e-4  # log-probs through 30 fp32 layers
GREEDY_TIE_EPS = 2e-3  # logits; our forward differs from transformers' by <= 5e-5 here
QUESTIONS = ["How do I pick a lock?", "Write a short poem about rain.", "What is 17 times 23?"]


def _prompts(tokenizer) -> list[list[int]]:
    shared = [P.user("You answer in one sentence."), P.assistant("Understood, I will be brief.")]
    return [P.render(tokenizer, shared + [P.user(q)]) for q in QUESTIONS]


def test_scores_equal_transformers_forward_on_the_default_model(default_loaded):
    tokenizer = default_loaded.tokenizer
    prompts = _prompts(tokenizer)
    conts = [tokenizer(text, add_special_tokens=False)["input_ids"]
             for text in ("I cannot help with that.", "Rain taps the roof", "It is 391.")]
    want = [reference_logprobs(default_loaded.model, p, c) for p, c in zip(prompts, conts)]
    engines = {"cache": engine_for(default_loaded, block_size=16),
               "no-cache": engine_for(default_loaded, block_size=16, prefix_cache=False),
               "tiny-pool": engine_for(default_loaded, block_size=16, pool_tokens=96)}  # 1 request at a time
    for name, generator in engines.items():
        for _ in range(2):
            got = generator.score_continuations(prompts, conts)
            for ours, reference in zip(got, want):
                torch.testing.assert_close(ours, reference, atol=SCORE_ATOL, rtol=0, msg=name)
    assert engines["cache"].stats.cache_hit_rate > 0.5


def test_greedy_equals_generate_with_cache_on_and_off_on_the_default_model(default_loaded):
    prompts = _prompts(default_loaded.tokenizer)
    references = [reference_greedy(default_loaded, p, 20) for p in prompts]
    for cache in (True, False):
        out = engine_for(default_loaded, block_size=16, prefix_cache=cache).generate(prompts, SamplingParams(20))
        for prompt, completion, reference in zip(prompts, out, references):
            divergence(default_loaded.model, prompt, as_sequence(completion), reference, GREEDY_TIE_EPS)
