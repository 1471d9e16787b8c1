"""The decode step's layer loop in C++ (cai_fast.engine.decode_layers, csrc/decode_layers.cpp)
against its twin, the eager step that calls the same kernels one by one from Python: bit for bit,
on tiny random bf16 models whose sizes the AMX linear takes (Llama, Qwen2 with biases and a sliding
window, Mistral with one), at one, a few and many rows, with and without a shared prefix; and
where it applies and where the runner keeps the Python loop."""

from __future__ import annotations

import pytest
import torch

from cai_fast.engine import LoadedModel, SamplingParams, cpu_paths, linear
from cai_fast.engine.cached import CachedGenerator, EngineConfig
from cai_fast.engine.decode_layers import HAVE_DECODE_LAYERS

from helpers.engine import random_prompts


pytestmark = pytest.mark.skipif(not (HAVE_DECODE_LAYERS and linear.HAVE_AMX and cpu_paths.amx_allowed()),
                                reason="needs cai_fast._core's DecodeLayers and a CPU with AMX-BF16 tiles "
                                       "(not forced off: CAI_FAST_CPU)")


def _model(arch: str, dtype=torch.bfloat16):
    """A tiny random model with sizes that are multiples of 32 (head_dim 32), biases made to count."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    config_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2-biases-sliding": (Qwen2Config, Qwen2ForCausalLM,
                                 {"use_sliding_window": True, "sliding_window": 9, "max_window_layers": 1}),
        "mistral-sliding": (MistralConfig, MistralForCausalLM, {"sliding_window": 11}),
    }[arch]
    torch.manual_seed(3)
    config = config_cls(vocab_size=350, hidden_size=128, intermediate_size=224, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)
    model = model_cls(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.2)
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)  # not all ones: the norms' weights must be read
    return model.to(dtype)


def _both_loops(generator: CachedGenerator) -> list[tuple[int, bool]]:
    """Make each decode step that the C++ loop covers run both loops; returns (rows, equal) per step."""
    runner = generator.runner
    loop, forward, steps = runner.decode_layers, runner.forward, []

    def both(batch):
        plan = runner.attention.plan(batch.layout)
        if not loop.covers(batch, plan):
            return forward(batch)
        fast = loop(batch, plan).clone()
        runner.decode_layers = None  # the Python loop writes the same K/V into the same slots
        try:
            eager = forward(batch)
        finally:
            runner.decode_layers = loop
        steps.append((len(batch.input_ids), torch.equal(fast, eager)))
        return eager

    runner.forward = both
    return steps


@pytest.mark.parametrize("arch", ["llama", "qwen2-biases-sliding", "mistral-sliding"])
@pytest.mark.parametrize("n, shared", [(1, 0), (7, 40), (37, 21)])
def test_the_loop_in_cpp_is_the_eager_step_bit_for_bit(tiny_loaded, arch, n, shared):
    loaded = LoadedModel(_model(arch), tiny_loaded.tokenizer, arch)
    prompts = random_prompts(n + shared, n, shared=shared, lengths=(1, 25))
    generator = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(block_size=16, max_running=n))
    assert generator.runner.decode_layers is not None
    steps = _both_loops(generator)
    generator.generate(prompts, SamplingParams(max_new_tokens=14, temperature=1.0, seed=n))
    assert steps and all(equal for _, equal in steps), steps
    assert max(rows for rows, _ in steps) == n


def test_greedy_tokens_are_those_of_the_python_loop(tiny_loaded):
    loaded = LoadedModel(_model("qwen2-biases-sliding"), tiny_loaded.tokenizer, "qwen2")
    prompts = random_prompts(8, 11, shared=30)
    tokens = {}
    for loop in ("auto", "python"):
        generator = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(block_size=16, decode_loop=loop))
        assert (generator.runner.decode_layers is not None) == (loop == "auto")
        tokens[loop] = [c.token_ids for c in generator.generate(prompts, SamplingParams(max_new_tokens=12))]
    assert tokens["auto"] == tokens["python"]


@pytest.mark.parametrize("config, dtype", [
    ({"decode_loop": "python"}, torch.bfloat16),
    ({}, torch.float32),  # the AMX linear is bf16's
    ({"linear": "onednn"}, torch.bfloat16),
    ({"fused": False}, torch.bfloat16),
])
def test_where_the_runner_keeps_the_python_loop(tiny_loaded, config, dtype):
    model = _model("llama", dtype)
    generator = CachedGenerator(model, tiny_loaded.tokenizer, EngineConfig(block_size=16, **config))
    assert generator.runner.decode_layers is None


def test_which_steps_it_covers(tiny_loaded):
    """Decode steps of up to linear.MAX_ROWS rows; prefill and larger steps stay in Python."""
    loaded = LoadedModel(_model("llama"), tiny_loaded.tokenizer, "llama")
    n = linear.MAX_ROWS + 3
    generator = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(block_size=16, max_running=n))
    steps = _both_loops(generator)
    generator.generate(random_prompts(1, n, shared=10), SamplingParams(max_new_tokens=3))
    assert steps == []


def test_an_unknown_decode_loop_is_refused(tiny_loaded):
    with pytest.raises(ValueError, match="decode_loop must be one of auto, python, got 'cpp'"):
        CachedGenerator(tiny_loaded.model, tiny_loaded.tokenizer, EngineConfig(decode_loop="cpp"))


def test_bad_rows_are_refused_by_the_core(tiny_loaded):
    generator = CachedGenerator(_model("llama"), tiny_loaded.tokenizer, EngineConfig(block_size=16))
    with pytest.raises(ValueError, match="decode_layers: rows must be >= 0"):
        generator.runner.decode_layers.core.run(0, -1, 0, 0, 0, 0, 0, 0, 0)
