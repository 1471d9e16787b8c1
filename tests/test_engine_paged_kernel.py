"""The Triton paged-attention kernel (cai_fast.engine.attention.triton_kernel) against the torch path, under
TRITON_INTERPRET=1 on CPU: block sizes 1, 16 and 256, ragged lengths, shared prefixes (the decode
cascade), prefill over a cached prefix, a sliding window, key splits, a GQA group of 3 and an odd
head dim; then the engine on that path (greedy equal to the torch path's) and its decode step,
which reads one thing back from the device: the sampled tokens."""

from __future__ import annotations

import sys

import pytest
import torch

from cai_fast.engine.attention import HAVE_TRITON
from helpers.paged import CASES, both_paths, paged_engine

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

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


def test_engine_greedy_on_the_triton_path_equals_the_torch_path(tiny_loaded):
    from helpers.engine import random_prompts

    from cai_fast.engine import SamplingParams

    prompts = random_prompts(4, 5, shared=37)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    want = [c.token_ids for c in paged_engine(tiny_loaded, "torch").generate(prompts, params)]
    got = [c.token_ids for c in paged_engine(tiny_loaded, "triton").generate(prompts, params)]
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

    engine = paged_engine(tiny_loaded, "triton")
    steps = []
    real_step = engine._decode_step

    def counted(running):
        with _DeviceReads() as reads:
            real_step(running)
        steps.append(reads.where)

    engine._decode_step = counted
    from helpers.engine import random_prompts

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
