"""Batch invariance of the cached engine on the CPU: a request's greedy tokens, a scoring request's
log-probs and its answer-position states are bit-identical whatever else is in the batch, however
much of it was cached, in fp32 and bf16, on a tiny model and a wider one (a resumed run batches and
caches otherwise than an uninterrupted one)."""

from __future__ import annotations

import random

import pytest
import torch

from cai_fast.engine import load_model
from cai_fast.engine.base import SamplingParams
from cai_fast.engine.cached import CachedGenerator, EngineConfig

from helpers.tiny import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def wide_model_path(tmp_path_factory):
    """Hidden 256, MLP 512: sizes which cai_fast's AMX linear takes and at which oneDNN's bf16 linear on an AMX
    CPU changes blocking with the row count (held row by row in tests/test_invariant_linear.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("wide-llama"), hidden=256)


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float32-wide", "bfloat16-wide"])
def loaded(request, tiny_model_path, wide_model_path):
    dtype, _, wide = request.param.partition("-")
    return load_model(str(wide_model_path if wide else tiny_model_path), device="cpu", dtype=dtype)


def _prompts(loaded, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts after one 300-token prefix (a few-shot block), 20-90 tokens of their own."""
    rng = random.Random(seed)
    vocab = loaded.model.config.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(300)]
    return [prefix + [rng.randrange(vocab) for _ in range(rng.randint(20, 90))] for _ in range(n)]


def _engine(loaded, **options) -> CachedGenerator:
    return CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(max_running=7, **options))


def test_answer_states_alone_equal_in_a_batch_cached_or_not(loaded):
    prompts = _prompts(loaded, 12)
    engine = _engine(loaded)
    together = engine.answer_states(prompts)
    for i in (0, 4, 11):
        warm = engine.answer_states([prompts[i]])[0]  # its prompt cached: only the last block is computed
        cold = _engine(loaded).answer_states([prompts[i]])[0]
        assert torch.equal(warm, together[i]) and torch.equal(cold, together[i]), i


def test_scored_continuations_alone_equal_in_a_batch(loaded):
    prompts = _prompts(loaded, 9, seed=1)
    rng = random.Random(2)
    continuations = [[rng.randrange(loaded.model.config.vocab_size) for _ in range(rng.randint(1, 7))] for _ in prompts]
    together = _engine(loaded).score_continuations(prompts, continuations)
    engine = _engine(loaded, prefill_tokens=64)  # and split over several prefill batches
    for i in (0, 5, 8):
        assert torch.equal(engine.score_continuations([prompts[i]], [continuations[i]])[0], together[i]), i


def test_greedy_tokens_alone_equal_in_a_batch(loaded):
    prompts = _prompts(loaded, 8, seed=3)
    params = SamplingParams(max_new_tokens=12)
    together = _engine(loaded).generate(prompts, params)
    engine = _engine(loaded)
    for i in (0, 3, 7):
        assert engine.generate([prompts[i]], params)[0].token_ids == together[i].token_ids, i
