"""What every generator in cai_fast offers: token ids in, completions (or option log-probs) out.

A generator sees token ids only; it knows nothing of constitutions or chat templates. Callers
render and tokenize prompts (cai_fast.prompts) and hand over lists of ids. The tokenizer rides
along so that a generator can decode, find stop strings and report what it produced. The one
exception is a chat API (cai_fast.engine.chat_api: the server applies its own template, and its
tokenizer is None): `complete_chats` is where callers that hold chats hand them to either kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one batch of continuations.

    temperature 0 means greedy. `seed` makes sampling reproducible; `stop` ends a completion at
    the first occurrence of any of these strings (the stop string itself is cut off).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One generated continuation: its text, its token ids and why it stopped."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


@dataclass
class GenerationStats:
    """Running totals a generator keeps, for summaries and benches."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    calls: int = 0

    def add(self, completions: Sequence[Completion]) -> None:
        self.calls += 1
        self.prompt_tokens += sum(c.prompt_tokens for c in completions)
        self.generated_tokens += sum(len(c.token_ids) for c in completions)


class Generator(Protocol):
    tokenizer: object
    stats: GenerationStats

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """Continue each prompt (a list of token ids); one Completion per prompt, in order."""
        ...

    def score_options(self, prompts: Sequence[Sequence[int]],
                      options: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probs [N, K] (fp32, full-vocabulary softmax) of K options continuing each of N prompts.

        Each option is a token sequence; its log-prob is the sum over its tokens. When every option
        is one token this is one forward pass per prompt that reads the answer position only; no
        token is generated. The judge's verdicts come from here.
        """
        ...


def engine_record(generator) -> dict:
    """What ran a stage's generation, for its run summary: the generator, the kernel record of its
    runner (the cached engine's), and why it fell back to the plain generator where it did."""
    record = {"generator": type(generator).__name__}
    kernels = getattr(getattr(generator, "stats", None), "kernels", None)
    if kernels:
        record["kernels"] = kernels
    if getattr(generator, "fallback_reason", None):
        record["fallback"] = generator.fallback_reason
    return record


def complete_chats(generator, chats: Sequence[list[dict]], params: SamplingParams) -> list[Completion]:
    """The assistant's next turn of each chat: the messages themselves to a chat-API generator (one
    with `generate_chats`), else their token ids, rendered with the generator's chat template."""
    if hasattr(generator, "generate_chats"):
        return generator.generate_chats(chats, params)
    from ..data.prompts import render

    return generator.generate([render(generator.tokenizer, chat) for chat in chats], params)


def checked_prompts(prompts: Sequence[Sequence[int]], caller: str) -> list[list[int]]:
    """The prompts as lists of ints; ValueError naming `caller` and every empty prompt."""
    prompts = [[int(t) for t in p] for p in prompts]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"{caller}: prompts {empty} are empty; every prompt needs at least one token")
    return prompts


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string; say whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not hits:
        return text, False
    return text[: min(hits)], True


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: eos, plus ChatML's <|im_end|> where it exists."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)
