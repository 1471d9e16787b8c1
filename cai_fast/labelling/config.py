"""LabelConfig: the options of a labelling run (cai_fast.labelling; `cai-fast label`, [label] of a
pipeline config). Torch-free: imports cai_fast.config only."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_finite, option


@dataclass
class LabelConfig:
    samples: int = option(2, "responses sampled per prompt (with --prompts)")
    pairs_per_prompt: int = option(0, "pairs judged per prompt, drawn from all pairs of its samples (0 = all)")
    sample_tokens: int = option(128, "max new tokens of each sampled response")
    temperature: float = option(0.8, "sampling temperature of the responses (> 0)")
    top_p: float = option(0.95, "nucleus sampling threshold of the responses")

    def __post_init__(self):
        check_finite(self)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (pairs need two responses), got {self.samples}")
        if self.pairs_per_prompt < 0 or self.sample_tokens < 1:
            raise ValueError(f"pairs_per_prompt must be >= 0 and sample_tokens >= 1, got "
                             f"{self.pairs_per_prompt} and {self.sample_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy samples would all be the same), "
                             f"got {self.temperature}")
