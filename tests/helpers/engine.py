"""transformers' own forward and generate as the references of the cached engine, and the engine and
prompts the engine tests build (tests/test_engine_*.py, benches/bench_engine.py)."""

from __future__ import annotations

import random

import torch

from cai_fast.engine.base import end_of_turn_ids
from cai_fast.engine.cached import CachedGenerator, EngineConfig

SCORE_ATOL = 2e-5
GREEDY_TIE_EPS = 1e-3  # logits; our forward differs from transformers' by ~1e-6 here
END = "<end>"  # marks a completion that ended on an end-of-turn token


def engine_for(loaded, **config) -> CachedGenerator:
    settings = {"block_size": 4, "pool_tokens": 4096, "dedup_min_tokens": 8, **config}
    return CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(**settings))


def random_prompts(seed: int, n: int, *, shared: int = 23, vocab: int = 350, lengths=(1, 30)) -> list[list[int]]:
    """n prompts: a common prefix of `shared` tokens, then 1-30 own tokens (odd, uneven lengths)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(shared)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


@torch.inference_mode()
def reference_logprobs(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """transformers' own forward: log-probs of each continuation token."""
    logits = model(input_ids=torch.tensor([prompt + continuation])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    return logp.gather(1, torch.tensor(continuation)[:, None])[:, 0]


@torch.inference_mode()
def reference_greedy(loaded, prompt: list[int], max_new: int) -> list:
    """transformers' generate, one prompt alone, greedy; END after an end-of-turn token."""
    stops = end_of_turn_ids(loaded.tokenizer)
    out = loaded.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=max_new, eos_token_id=stops,
                                pad_token_id=loaded.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    new = out[0, len(prompt):].tolist()
    ended = next((i for i, t in enumerate(new) if t in stops), None)
    return new if ended is None else new[:ended] + [END]


def as_sequence(completion) -> list:
    return completion.token_ids + ([END] if completion.finish_reason == "stop" else [])


@torch.inference_mode()
def top2_gap(model, tokens: list[int]) -> float:
    top = model(input_ids=torch.tensor([tokens])).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def divergence(model, prompt: list[int], ours: list, reference: list, eps: float) -> int | None:
    """The step where two greedy sequences part (None if they do not); asserts it is a near tie."""
    step = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    if step is None and len(ours) != len(reference):
        step = min(len(ours), len(reference))
    if step is None:
        return None
    gap = top2_gap(model, prompt + reference[:step])
    assert gap < eps, (f"greedy outputs part at step {step} where the top-2 logits differ by {gap:.3g} "
                       f">= {eps}: ours {ours[step:step + 5]}, reference {reference[step:step + 5]}")
    return step
