"""Sampled responses of a policy: the one sampler behind labelling, the pipeline and evaluation.

    sample_responses(generator, prompts, params, samples, store=..., kind=...) -> (records, resumed)

A record is {prompt_id, prompt, source, sample_ids, samples} — `samples` responses to one
prompt, the format `cai_fast.labelling.pairs.pairs_from_samples` pairs up. Prompts go `batch_size //
samples` at a time (at least one); each batch's sampling seed is stable_seed(params.seed, its
first prompt's id, kind), so a resumed run samples exactly what an uninterrupted one would.
With a store, records are appended batch by batch and read back on resume.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .data import prompts as P
from .data import Prompt
from .engine.base import SamplingParams, complete_chats
from .seeding import stable_seed
from .store import RunStore, resume_batches


def sample_responses(generator, prompts: Sequence[Prompt], params: SamplingParams, samples: int, *,
                     store: RunStore | None = None, kind: str = "samples", batch_size: int = 8,
                     progress: bool = True) -> tuple[list[dict], int]:
    """`samples` responses per prompt from `generator` (see the module docstring); (records in the
    prompts' order, how many were read from an earlier run)."""

    def work(batch: list[Prompt]) -> list[dict]:
        chats = [[P.user(p.text)] for p in batch for _ in range(samples)]
        seeded = replace(params, seed=stable_seed(params.seed, batch[0].id, kind))
        texts = [c.text for c in complete_chats(generator, chats, seeded)]
        return [{"prompt_id": p.id, "prompt": p.text, "source": p.source,
                 "sample_ids": [f"{p.id}-{k}" for k in range(samples)],
                 "samples": texts[j * samples : (j + 1) * samples]} for j, p in enumerate(batch)]

    return resume_batches(store, kind, prompts, work, batch_size=max(1, batch_size // samples), desc=kind,
                          progress=progress)
