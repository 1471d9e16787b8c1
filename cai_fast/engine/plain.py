"""The plain generator: transformers `generate` on left-padded batches, no prefix sharing.

It is the reference path for the cached engine and the `--engine plain` choice. Sampling is
seeded per call: the same prompts in the same batches with the same params give the same
completions (transformers samples from torch's global generator, which is reseeded here).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig

from .base import Completion, GenerationStats, SamplingParams, cut_at_stop, end_of_turn_ids


class PlainGenerator:
    def __init__(self, model, tokenizer, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.stats = GenerationStats()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            torch.manual_seed(params.seed + start)
            out += self._generate_batch(prompts[start : start + self.batch_size], params)
        self.stats.add(out)
        return out

    @torch.inference_mode()
    def _generate_batch(self, batch: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        width = max(len(p) for p in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = self.model.generate(
            input_ids=ids.to(self.model.device),
            attention_mask=mask.to(self.model.device),
            generation_config=self._generation_config(params),
            tokenizer=self.tokenizer if params.stop else None,
        )
        return [self._completion(row[width:].tolist(), len(p), params) for row, p in zip(out, batch)]

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        sample = params.temperature > 0
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=list(params.stop) or None,
        )

    def _completion(self, new: list[int], prompt_tokens: int, params: SamplingParams) -> Completion:
        ended = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        tokens = new if ended is None else new[:ended]
        text, stopped = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
        reason = "stop" if ended is not None or stopped else "length"
        return Completion(text.strip(), tokens, prompt_tokens, reason)
