"""JudgeConfig: the options of the constitutional judge (cai_fast.labelling.judge; `cai-fast label` and
`cai-fast evaluate`, [judge] of a pipeline config). Torch-free: imports cai_fast.config only."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option

AGGREGATES = ("prob", "logodds")  # as cai_fast.ops.swapped_pair_scores takes them
# A direct score (d-RLAIF) is one of 1..9, each a single digit: no "10", whose first token "1" would also read as 1
SCORES = tuple(range(1, 10))


@dataclass
class JudgeConfig:
    principles: int = option(4, "principles drawn per pair (by weight, without replacement); each is "
                                 "asked in both orders")
    principle_ids: str = option("", "comma-separated principle ids asked for every pair instead of drawing")
    aggregate: str = option("prob", "how principle labels combine: prob (mean probability) or logodds")
    few_shot: int = option(0, "judge examples made from the constitution's few-shot examples (each adds "
                               "about 250 tokens to every judge prompt)")
    chain_of_thought: bool = option(False, "1 = a rationale is generated before the verdict; probabilities "
                                       "are clamped to [0.4, 0.6]")
    cot_tokens: int = option(64, "max new tokens of each rationale (with chain_of_thought)")
    defend: bool = option(True, "1 = quote the conversation and responses between tagged markers with special "
                             "tokens broken up; 0 only to measure the injection defence")
    batch_size: int = option(16, "judge prompts per forward pass (and sampled responses per batch)")
    seed: int = option(0, "seed for principle draws, response sampling and pair selection")
    option_mass: int = option(0, "1 = also compute each option's full-vocabulary probability (a diagnostic: "
                                  "labels then go through a full-vocabulary softmax at every answer position)")
    tag_key: str = option("", "secret key of the section markers' tag (kept in the run config; empty: "
                              "derived from seed)")

    def __post_init__(self):
        if not isinstance(self.principle_ids, str):
            self.principle_ids = ",".join(self.principle_ids)
        for name in ("principles", "batch_size", "cot_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.few_shot < 0:
            raise ValueError(f"few_shot must be >= 0, got {self.few_shot}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        for name in ("chain_of_thought", "defend", "option_mass"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1, got {getattr(self, name)!r}")

    @property
    def fixed_ids(self) -> list[str]:
        return [i.strip() for i in self.principle_ids.split(",") if i.strip()]
