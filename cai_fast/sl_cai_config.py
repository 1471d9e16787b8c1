"""SLCAIConfig: the options of an SL-CAI run (cai_fast.sl_cai; `cai-fast sl-cai`, [sl_cai] of a
pipeline config). Torch-free: imports cai_fast.config only."""

from __future__ import annotations

from dataclasses import dataclass

from .config import check_finite, option

REVISION_TURNS = ("chat", "fresh")


@dataclass
class SLCAIConfig:
    rounds: int = option(2, "critique-revision rounds per prompt (1-4)")
    seed: int = option(0, "seed for principle sampling and generation")
    batch_size: int = option(8, "prompts generated together")
    few_shot: int = option(3, "few-shot examples from the constitution (0 = none)")
    answer_tokens: int = option(128, "max new tokens of the initial answer")
    critique_tokens: int = option(96, "max new tokens of each critique")
    revision_tokens: int = option(128, "max new tokens of each revision")
    temperature: float = option(0.7, "sampling temperature (0 = greedy)")
    top_p: float = option(0.9, "nucleus sampling threshold")
    revision_turn: str = option("chat", "how a revision is asked for: chat (a turn of the growing chat, after the "
                                        "critique) or fresh (one new user turn quoting the request, the answer and "
                                        "the critique)")
    filter: bool = option(True, "SFT and the preference pairs keep only final revisions that are replies to the "
                                "user, not commentary, loops, truncated, empty or unchanged (cai_fast.revisions)")
    min_kept: int = option(4, "fewest revisions the filter may keep to train on: below it the run says so, and the "
                              "pipeline's SFT does not run (the round goes on from its starting policy)")

    def __post_init__(self):
        check_finite(self)
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
        if self.revision_turn not in REVISION_TURNS:
            raise ValueError(f"revision_turn must be one of {', '.join(REVISION_TURNS)}, got {self.revision_turn!r}")
        if not 1 <= self.rounds <= 4:
            raise ValueError(f"rounds must be between 1 and 4, got {self.rounds}")
        for name in ("batch_size", "answer_tokens", "critique_tokens", "revision_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("few_shot", "min_kept"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
