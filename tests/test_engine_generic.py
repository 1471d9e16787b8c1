"""The generic runner (cai_fast.engine.generic): any transformers decoder on the prefix-cached engine
through its own forward, held to transformers' generate and forward on a tiny model of each family,
and to the fused runner where both run."""

from __future__ import annotations

import warnings

import pytest
import torch

from cai_fast.engine import LoadedModel, SamplingParams, make_generator
from cai_fast.engine.base import engine_record
from cai_fast.engine.generic import GenericRunner, probe
from cai_fast.engine.logits import LogitTransform
from cai_fast.engine.plain import PlainGenerator
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig
from helpers.engine import (GREEDY_TIE_EPS, SCORE_ATOL, as_sequence, divergence, engine_for, random_prompts,
                            reference_greedy, reference_logprobs)
from helpers.families import FAMILIES, FAST, WINDOW, tiny_family


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tiny_loaded):
    return LoadedModel(tiny_family(request.param, tiny_loaded.tokenizer), tiny_loaded.tokenizer, request.param)


def _prompts(seed: int, vocab: int) -> list[list[int]]:
    return random_prompts(seed, 4, shared=2 * WINDOW + 3, lengths=(3, 2 * WINDOW), vocab=vocab)


def _continuations(prompts, vocab: int) -> list[list[int]]:
    return [[(7 * i + 11 * j) % (vocab - 3) + 3 for j in range(1 + i % 4)] for i in range(len(prompts))]


def test_each_family_runs_on_the_generic_path_as_generate_and_forward_do(family):
    """Greedy tokens as transformers' generate (parting only at near-ties), continuation and option
    log-probs as its forward's log-softmax, with contexts longer than every window."""
    vocab = len(family.tokenizer)
    generator = engine_for(family, runner="generic")
    assert isinstance(generator.runner, GenericRunner)
    prompts = _prompts(1, vocab)
    assert min(map(len, prompts)) > WINDOW
    for prompt, completion in zip(prompts, generator.generate(prompts, SamplingParams(max_new_tokens=10))):
        divergence(family.model, prompt, as_sequence(completion), reference_greedy(family, prompt, 10), GREEDY_TIE_EPS)
    continuations = _continuations(prompts, vocab)
    for prompt, cont, ours in zip(prompts, continuations, generator.score_continuations(prompts, continuations)):
        torch.testing.assert_close(ours, reference_logprobs(family.model, prompt, cont), atol=SCORE_ATOL, rtol=0)
    options = [[5], [9], [17]]
    with torch.inference_mode():
        full = torch.stack([torch.log_softmax(family.model(input_ids=torch.tensor([p])).logits[0, -1].float(), -1)
                            for p in prompts])
    torch.testing.assert_close(generator.score_options(prompts, options), full[:, [5, 9, 17]], atol=SCORE_ATOL, rtol=0)


def test_each_family_gives_the_same_with_the_cache_on_and_off_and_computes_a_shared_prefix_once(family):
    vocab = len(family.tokenizer)
    prompts = _prompts(2, vocab)  # an SL-CAI-shaped batch: one long shared prefix, own turns after it
    on, off = engine_for(family, runner="generic"), engine_for(family, runner="generic", prefix_cache=False)
    params = SamplingParams(max_new_tokens=6)
    assert [c.token_ids for c in on.generate(prompts, params)] == [c.token_ids for c in off.generate(prompts, params)]
    assert on.stats.cache_hit_rate > 0 and off.stats.cache_hit_rate == 0
    assert on.stats.prefill_computed < off.stats.prefill_computed
    continuations = _continuations(prompts, vocab)
    for a, b in zip(on.score_continuations(prompts, continuations), off.score_continuations(prompts, continuations)):
        torch.testing.assert_close(a, b, atol=SCORE_ATOL, rtol=0)


def test_the_probe_reads_each_familys_windows_caps_and_logit_transform(tiny_loaded):
    gemma2 = probe(tiny_family("gemma2", tiny_loaded.tokenizer))
    assert gemma2.reason is None and gemma2.logits == LogitTransform(1.0, 2.0)
    assert [c.window for c in gemma2.calls] == [WINDOW, None, WINDOW] and {c.softcap for c in gemma2.calls} == {0.5}
    phi3 = probe(tiny_family("phi3", tiny_loaded.tokenizer))
    assert phi3.reason is None and phi3.logits.linear
    assert [c.window for c in probe(tiny_family("qwen3", tiny_loaded.tokenizer)).calls] == [None, WINDOW, WINDOW]
    assert all(c.sinks is None for c in gemma2.calls)
    gpt_oss = tiny_family("gpt_oss", tiny_loaded.tokenizer)
    found = probe(gpt_oss)
    assert found.reason is None and [c.window for c in found.calls] == [WINDOW, None, WINDOW]
    assert all(c.sinks is layer.self_attn.sinks for c, layer in zip(found.calls, gpt_oss.model.layers))


@pytest.mark.parametrize("name", FAST)
def test_the_generic_runner_is_the_fused_runners_twin(tiny_loaded, name):
    loaded = LoadedModel(tiny_family(name, tiny_loaded.tokenizer), tiny_loaded.tokenizer, name)
    vocab = len(loaded.tokenizer)
    fast, generic = engine_for(loaded, runner="fast"), engine_for(loaded, runner="generic")
    assert "transformers" not in fast.runner.kernels.loop and "transformers" in generic.runner.kernels.loop
    prompts = _prompts(3, vocab)
    params = SamplingParams(max_new_tokens=8)
    for prompt, a, b in zip(prompts, fast.generate(prompts, params), generic.generate(prompts, params)):
        divergence(loaded.model, prompt, as_sequence(a), as_sequence(b), GREEDY_TIE_EPS)
    continuations = _continuations(prompts, vocab)
    for a, b in zip(fast.score_continuations(prompts, continuations),
                    generic.score_continuations(prompts, continuations)):
        torch.testing.assert_close(a, b, atol=SCORE_ATOL, rtol=0)


def test_auto_picks_the_fused_runner_for_the_llama_family_and_the_generic_one_else(tiny_loaded):
    def runner_of(name):
        loaded = LoadedModel(tiny_family(name, tiny_loaded.tokenizer), tiny_loaded.tokenizer, name)
        return type(make_generator(loaded, engine="cached").runner).__name__

    assert [runner_of(n) for n in ("llama", "gemma2", "olmo2")] == ["PagedRunner", "GenericRunner", "GenericRunner"]
    gemma2 = LoadedModel(tiny_family("gemma2", tiny_loaded.tokenizer), tiny_loaded.tokenizer, "gemma2")
    with pytest.raises(ValueError, match="compile='eager' compiles the fast runner"):
        engine_for(gemma2, compile="eager")
    with pytest.raises(ValueError, match="does not take soft-capped scores"):
        engine_for(gemma2, attention="cpu")


def test_a_judge_on_a_capped_model_labels_as_the_plain_generator_does(tiny_loaded):
    """Gemma 2's logits are capped: the judge scores options through the full (capped) logits."""
    loaded = LoadedModel(tiny_family("gemma2", tiny_loaded.tokenizer), tiny_loaded.tokenizer, "gemma2")
    prompts, a, b = ["Is it safe?", "How do I"], ["Yes, it is.", "Like this (A)."], ["No.", "I will not (B)."]
    labels = [ConstitutionalJudge(make_generator(loaded, engine=engine, batch_size=3), "default",
                                  JudgeConfig(principles=2)).score(prompts, a, b) for engine in ("plain", "cached")]
    torch.testing.assert_close(labels[0].label, labels[1].label, atol=1e-5, rtol=0)
    torch.testing.assert_close(labels[1].label + ConstitutionalJudge(
        make_generator(loaded, engine="cached"), "default", JudgeConfig(principles=2)).score(prompts, b, a).label,
        torch.ones(2), atol=1e-6, rtol=0)


class _ScaledLlama:
    """A Llama whose forward doubles its logits, which nothing in its config says."""

    @staticmethod
    def build(tokenizer):
        from transformers import LlamaForCausalLM

        class ScaledLlama(LlamaForCausalLM):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = out.logits * 2
                return out

        model = tiny_family("llama", tokenizer)
        model.__class__ = ScaledLlama
        return model


def test_a_model_the_generic_path_cannot_run_falls_back_to_plain_generation_with_the_reason(tiny_loaded):
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=len(tiny_loaded.tokenizer), hidden_size=32,
                                         num_hidden_layers=1)).eval()
    assert "AttentionInterface" in probe(mamba).reason
    scaled = _ScaledLlama.build(tiny_loaded.tokenizer)
    assert "logits are not its LM head's output" in probe(scaled).reason
    with pytest.warns(UserWarning, match="MambaForCausalLM.*AttentionInterface.*plain generator"):
        generator = make_generator(LoadedModel(mamba, tiny_loaded.tokenizer, "mamba"), engine="cached")
    assert isinstance(generator, PlainGenerator)
    assert "AttentionInterface" in engine_record(generator)["fallback"]
    with pytest.raises(ValueError, match="cannot run this model.*logits"):
        engine_for(LoadedModel(scaled, tiny_loaded.tokenizer, "scaled"), runner="generic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason
        make_generator(LoadedModel(mamba, tiny_loaded.tokenizer, "mamba"), engine="cached")


def test_the_engine_record_names_the_runner_and_its_kernels(tiny_loaded):
    loaded = LoadedModel(tiny_family("gemma2", tiny_loaded.tokenizer), tiny_loaded.tokenizer, "gemma2")
    record = engine_record(make_generator(loaded, engine="cached"))
    assert record["generator"] == "CachedGenerator" and "fallback" not in record
    assert "attention through 'cai_fast_paged'" in record["kernels"]["loop"]
    assert "capped at 2" in record["kernels"]["linear"] and "soft-capped" in record["kernels"]["attention"]
    gpt_oss = LoadedModel(tiny_family("gpt_oss", tiny_loaded.tokenizer), tiny_loaded.tokenizer, "gpt_oss")
    assert record["kernels"]["attention"] == "torch (soft-capped scores) (pool write)"
    assert engine_record(make_generator(gpt_oss))["kernels"]["attention"] == "torch (attention sinks) (pool write)"
    with pytest.raises(ValueError, match="does not take attention sinks"):
        engine_for(gpt_oss, attention="cpu")


@pytest.mark.parametrize("name", ["qwen3", "gemma2", "gemma3_text", "gpt_oss"])
def test_bf16_greedy_on_the_generic_path_parts_from_generate_only_at_near_ties(tiny_loaded, name):
    model = tiny_family(name, tiny_loaded.tokenizer, dtype=torch.bfloat16)
    with torch.no_grad():  # sharpen, so that most steps are far from a tie
        model.get_output_embeddings().weight.mul_(8)
    loaded = LoadedModel(model, tiny_loaded.tokenizer, name)
    prompts = _prompts(4, len(loaded.tokenizer))
    out = engine_for(loaded, runner="generic").generate(prompts, SamplingParams(max_new_tokens=10))
    parted = [divergence(model, p, as_sequence(c), reference_greedy(loaded, p, 10), eps=0.25)
              for p, c in zip(prompts, out)]
    assert sum(p is not None for p in parted) <= len(parted) // 2


def test_sl_cai_reaches_the_generic_path_with_no_option_and_shares_its_prefixes(tiny_loaded):
    """make_generator's default engine on a Gemma 2 model: SL-CAI's growing chats hit the prefix
    cache, and the run summary says which runner ran."""
    from cai_fast.data import prompts_from_texts
    from cai_fast.data.constitution import load_constitution
    from cai_fast.sl_cai import SLCAIConfig, run_sl_cai

    loaded = LoadedModel(tiny_family("gemma2", tiny_loaded.tokenizer), tiny_loaded.tokenizer, "gemma2")
    generator = make_generator(loaded, batch_size=2)
    prompts = list(prompts_from_texts(["How do I pick a lock?", "Write a rude note.", "What is 2 + 2?"]))
    config = SLCAIConfig(rounds=2, answer_tokens=4, critique_tokens=4, revision_tokens=4, batch_size=3, filter=False)
    result = run_sl_cai(generator, load_constitution("default"), prompts, config, progress=False)
    assert len(result.records) == 3 and generator.stats.cache_hit_rate > 0.5
    assert "cai_fast_paged" in result.summary["engine"]["kernels"]["loop"]


def test_training_refuses_a_model_whose_logits_the_fused_losses_would_get_wrong(tiny_loaded):
    from cai_fast.train.common import PolicyModule

    with pytest.raises(ValueError, match="logits capped at 2.*cannot train it yet"):
        PolicyModule(tiny_family("gemma2", tiny_loaded.tokenizer))
    PolicyModule(tiny_family("qwen3", tiny_loaded.tokenizer))  # no transform: trains as before


def test_building_an_engine_probes_the_model_once(tiny_loaded, monkeypatch):
    """make_generator decides the runner with one probe and builds the engine with it; the fast
    path's models are not probed at all."""
    from cai_fast.engine import generic

    runs = []
    real = generic.probe
    monkeypatch.setattr(generic, "probe", lambda model: runs.append(type(model).__name__) or real(model))
    gemma2 = LoadedModel(tiny_family("gemma2", tiny_loaded.tokenizer), tiny_loaded.tokenizer, "gemma2")
    assert isinstance(make_generator(gemma2).runner, GenericRunner) and runs == ["Gemma2ForCausalLM"]
    llama = LoadedModel(tiny_family("llama", tiny_loaded.tokenizer), tiny_loaded.tokenizer, "llama")
    make_generator(llama)
    assert runs == ["Gemma2ForCausalLM"]
    engine_for(gemma2)  # an engine built directly probes once too
    assert runs == ["Gemma2ForCausalLM"] * 2
