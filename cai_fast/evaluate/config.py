"""EvalConfig: the options of an evaluation (cai_fast.evaluate; `cai-fast evaluate`, [eval] of a
pipeline config), and parse_ladder for its depth ladder. Torch-free: imports cai_fast.config only."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option

JUDGE_DTYPES = ("float32", "bfloat16", "float16")  # engine.device.DTYPES, named without torch


@dataclass
class EvalConfig:
    harmless_prompts: str = option("red_team", "red-team prompts for the harmlessness win-rate (file or shipped set)")
    harmless_size: int = option(8, "harmlessness prompts sampled from harmless_prompts")
    helpful_prompts: str = option("benign", "helpful prompts for the helpfulness win-rate (those of a set "
                                             "with looks_dangerous that do not look dangerous)")
    helpful_size: int = option(8, "helpfulness prompts sampled")
    over_refusal_prompts: str = option("benign", "benign prompts that look dangerous (looks_dangerous true, "
                                                  "or the whole set without that field)")
    over_refusal_size: int = option(12, "over-refusal prompts sampled")
    response_tokens: int = option(96, "max new tokens of each greedy evaluation response")
    harmless_constitution: str = option("default", "constitution the harmlessness judge asks")
    helpful_constitution: str = option("helpful", "constitution the helpfulness judge asks")
    judge_model: str = option("", "model that judges the win-rates (default: the pipeline's judge, "
                                   "else the base model)")
    benchmarks: str = option("", "capability sets, comma-separated paths: GSM8K-style .jsonl, "
                                  "multiple-choice .json (BIG-Bench-Hard or TruthfulQA mc1 format)")
    benchmark_size: int = option(20, "examples sampled per benchmark")
    gsm8k_tokens: int = option(160, "max new tokens of each GSM8K-style answer")
    skip_missing_benchmarks: bool = option(False, "a benchmark or human_preferences file that does not exist is "
                                                  "skipped (and reported) instead of being an error")
    human_preferences: str = option("", "human-labelled pairs the judge is checked against (hh-rlhf transcripts "
                                         "or trl preference JSONL, chosen = people's choice); empty = no check")
    human_size: int = option(32, "pairs sampled from human_preferences")
    human_dtypes: str = option("", "also check the judge against people in each of these dtypes, comma-separated "
                                    "(float32, bfloat16, float16): agreement and judging time per dtype, to "
                                    "choose the labels' precision; empty = the run's dtype only")
    depth_ladder: str = option("0,10,30,100", "depth of alignment: numbers of harmful examples a copy of the model "
                                              "is fine-tuned on, comma-separated; empty = not measured")
    depth_data: str = option("", "SL-CAI run folder whose compliant initial answers are the harmful examples "
                                 "(the pipeline uses round 1's); empty = depth not measured by cai-fast evaluate")
    depth_size: int = option(8, "red-team prompts (the first of the harmlessness set) measured after each "
                                "fine-tune")
    depth_tokens: int = option(64, "max new tokens of each response measured for depth (a refusal shows in "
                                   "the opening clauses)")
    depth_epochs: float = option(3.0, "epochs of each depth fine-tune")
    depth_lr: float = option(5e-5, "learning rate of each depth fine-tune (full fine-tuning)")
    generation_batch: int = option(8, "prompts generated or scored together")
    subset_seed: int = option(0, "seed of the sampled prompt and benchmark subsets")

    def __post_init__(self):
        if not isinstance(self.benchmarks, str):
            self.benchmarks = ",".join(self.benchmarks)
        for name in ("harmless_size", "helpful_size", "over_refusal_size", "response_tokens", "benchmark_size",
                     "gsm8k_tokens", "generation_batch", "human_size", "depth_size", "depth_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip_missing_benchmarks not in (0, 1):
            raise ValueError(f"skip_missing_benchmarks must be 0 or 1, got {self.skip_missing_benchmarks!r}")
        if self.depth_epochs <= 0 or self.depth_lr <= 0:
            raise ValueError(f"depth_epochs and depth_lr must be > 0, got {self.depth_epochs} and {self.depth_lr}")
        parse_ladder(self.depth_ladder)
        unknown = [d for d in self.judge_dtypes if d not in JUDGE_DTYPES]
        if unknown:
            raise ValueError(f"human_dtypes: {', '.join(unknown)} is not a dtype; use {', '.join(JUDGE_DTYPES)}")

    @property
    def judge_dtypes(self) -> list[str]:
        """human_dtypes as a list."""
        return [d.strip() for d in self.human_dtypes.split(",") if d.strip()]

    @property
    def depth_rungs(self) -> list[int]:
        return parse_ladder(self.depth_ladder)

    @property
    def benchmark_paths(self) -> list[str]:
        return [p.strip() for p in self.benchmarks.split(",") if p.strip()]


def parse_ladder(text: str) -> list[int]:
    """A depth ladder "0,10,30" as whole numbers >= 0 (empty: depth is not measured)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"depth_ladder must be whole numbers >= 0, comma-separated (e.g. '0,10,30,100'), "
                         f"got {text!r}")
    return [int(p) for p in parts]
