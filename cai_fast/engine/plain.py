"""The plain generator: transformers `generate` on left-padded batches, no prefix sharing.

It is the reference path for the cached engine and the `--engine plain` choice. Sampling is
seeded per call: the same prompts in the same batches with the same params give the same
completions (transformers samples from torch's global generator, which is reseeded here).

Scoring (`score_options`) runs the decoder without its LM head and applies the head through
`cai_fast.ops` to the few positions that matter, so the [tokens × vocab] logits never exist. It
assumes what holds for the Llama family: logits = LM head (weight, optional bias) applied to the
decoder's final hidden state, with no soft-capping or scaling after it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig

from ..ops import linear_logprobs, linear_option_logprobs
from .base import Completion, GenerationStats, SamplingParams, cut_at_stop, end_of_turn_ids
from .logits import LogitTransform, head_logprobs


class PlainGenerator:
    def __init__(self, model, tokenizer, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.stats = GenerationStats()
        self.logits = LogitTransform.of(model.config)  # scoring reads the head's output as is only where linear
        self.fallback_reason: str | None = None  # set by make_generator when the cached engine could not run it

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            torch.manual_seed(params.seed + start)
            out += self._generate_batch(prompts[start : start + self.batch_size], params)
        self.stats.add(out)
        return out

    def _left_padded(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        return ids.to(self.model.device), mask.to(self.model.device)

    @torch.inference_mode()
    def _generate_batch(self, batch: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        ids, mask = self._left_padded(batch)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask,
            generation_config=self._generation_config(params),
            tokenizer=self.tokenizer if params.stop else None,
        )
        width = ids.shape[1]
        return [self._completion(row[width:].tolist(), len(p), params) for row, p in zip(out, batch)]

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        sample = params.temperature > 0
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=0,  # None would let transformers apply its default top-k of 50
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

    def score_options(self, prompts: Sequence[Sequence[int]],
                      options: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probs [N, K] of each option continuing each prompt (see `Generator.score_options`)."""
        if not options or any(len(o) == 0 for o in options):
            raise ValueError(f"score_options: every option needs at least one token, got {options!r}")
        if all(len(o) == 1 for o in options):
            ids = torch.tensor([o[0] for o in options], device=self.model.device)
            rows = [self._next_token_logprobs(prompts[i : i + self.batch_size], ids)
                    for i in range(0, len(prompts), self.batch_size)]
        else:
            seqs = [list(p) + list(o) for p in prompts for o in options]
            lengths = [len(o) for _ in prompts for o in options]
            rows = [self._sequence_logprobs(seqs[i : i + self.batch_size], lengths[i : i + self.batch_size])
                    for i in range(0, len(seqs), self.batch_size)]
        return torch.cat(rows).reshape(len(prompts), len(options)).float().cpu()

    @torch.inference_mode()
    def _final_states(self, batch: Sequence[Sequence[int]]) -> torch.Tensor:
        """The decoder's final hidden states [B, T, H] of a left-padded batch (positions from 0)."""
        ids, mask = self._left_padded(batch)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions)
        return out.last_hidden_state

    def _head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    @torch.inference_mode()
    def _next_token_logprobs(self, batch: Sequence[Sequence[int]], option_ids: torch.Tensor) -> torch.Tensor:
        last = self._final_states(batch)[:, -1]
        if not self.logits.linear:
            return head_logprobs(last, self.model.get_output_embeddings(), self.logits)[:, option_ids]
        weight, bias = self._head()
        logp, _ = linear_option_logprobs(last, weight, option_ids, bias)
        return logp

    @torch.inference_mode()
    def _sequence_logprobs(self, batch: Sequence[Sequence[int]], lengths: Sequence[int]) -> torch.Tensor:
        """Summed log-probs of the last lengths[r] tokens of each sequence r of the batch."""
        states = self._final_states(batch)
        hidden = torch.cat([states[r, -n - 1 : -1] for r, n in enumerate(lengths)])
        targets = torch.tensor([t for seq, n in zip(batch, lengths) for t in seq[-n:]], device=hidden.device)
        if self.logits.linear:
            weight, bias = self._head()
            token_logp = linear_logprobs(hidden, weight, targets, bias)
        else:
            token_logp = head_logprobs(hidden, self.model.get_output_embeddings(), self.logits).gather(
                1, targets[:, None])[:, 0]
        return torch.stack([part.sum() for part in token_logp.split(lengths)])
