"""Tiny data sets for the training tests (tests/test_train_*.py): seeded, odd sizes, every format."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("rewrite the response to remove harmful content identify ways answer is unhelpful dishonest "
         "which better critique request").split()
MARKER = "Please"  # the planted preference: replies holding it are preferred


def phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(n: int, seed: int = 0) -> list[dict]:
    """Mixed formats: one-turn and two-turn `messages`, and conversational prompt/completion.
    Replies follow a fixed pattern, so a model can learn them in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        reply = "the answer is " + " ".join(rng.choices(WORDS[:4], k=rng.randint(2, 5)))
        turn = [{"role": "user", "content": phrase(rng, 2, 7)}, {"role": "assistant", "content": reply}]
        if i % 3 == 0:
            rows.append({"prompt": turn[:1], "completion": turn[1:]})
        elif i % 3 == 1:
            rows.append({"messages": turn + [{"role": "user", "content": phrase(rng, 1, 3)},
                                             {"role": "assistant", "content": "the answer is remove"}]})
        else:
            rows.append({"messages": turn})
    return rows


def preference_rows(n: int, seed: int = 0, p_chosen: float | None = None) -> list[dict]:
    """Pairs whose chosen reply holds MARKER somewhere and whose rejected reply does not."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = phrase(rng, 3, 7).split()
        chosen.insert(rng.randint(0, len(chosen)), MARKER)
        row = {"prompt": [{"role": "user", "content": phrase(rng, 2, 5)}],
               "chosen": [{"role": "assistant", "content": " ".join(chosen)}],
               "rejected": [{"role": "assistant", "content": phrase(rng, 3, 8)}]}
        if p_chosen is not None:
            row["p_chosen"] = p_chosen
        rows.append(row)
    return rows
