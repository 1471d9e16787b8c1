"""Prompt templates, written for the prefix cache.

An SL-CAI conversation is one growing chat:

    [few-shot block]  user: x   assistant: y0
                      user: critique request (principle 1)   assistant: c1
                      user: revision request (principle 1)   assistant: y1
                      user: critique request (principle 2)   ...

Every step's prompt is the previous step's prompt plus what the model said plus one new user
turn, so a prefix cache computes each token once. The few-shot block (critique and revision
examples from the constitution) comes first and is identical for every prompt.
"""

from __future__ import annotations

from .constitution import Constitution, Principle

CRITIQUE_PREFIX = "Critique request: "
REVISION_PREFIX = "Revision request: "


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def critique_turn(principle: Principle) -> dict:
    return user(CRITIQUE_PREFIX + principle.critique)


def revision_turn(principle: Principle) -> dict:
    return user(REVISION_PREFIX + principle.revision)


def few_shot_messages(constitution: Constitution, n: int | None = None) -> list[dict]:
    """The first `n` few-shot examples (all when None) as finished critique/revision exchanges."""
    messages = []
    for example in constitution.few_shot[:n]:
        principle = (constitution.principle(example.principle) if example.principle
                     else constitution.principles[0])
        messages += [
            user(example.prompt), assistant(example.response),
            critique_turn(principle), assistant(example.critique),
            revision_turn(principle), assistant(example.revision),
        ]
    return messages


def render(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat, ending where the assistant's next turn begins."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
