"""The pairwise judge every RLAIF speed figure is compared to: what trl ≤ 1.0's HfPairwiseJudge did.

One chat call per pair (here: per pair and principle, so that it asks the same questions as
cai_fast's judge), the two responses in a random order, a generated one-token verdict, parsed;
-1 when the token is not an option. It uses cai_fast's judge template and answer prefix, so the
verdict token is the letter itself and the two judges read the same prompts; only the way the
work is run differs: one `model.generate(max_new_tokens=1)` call at a time, one order per pair,
hard verdicts instead of option probabilities.
"""

from __future__ import annotations

import random

import torch

from cai_fast.data import prompts as P
from cai_fast.labelling.trl_compat import response_text


@torch.inference_mode()
def _verdict(model, tokenizer, messages: list[dict], prefix: str, options: tuple[str, str]) -> int:
    """0 or 1 for the option the model generates after `prefix`, -1 for anything else."""
    ids = torch.tensor([P.render_continuation(tokenizer, messages, prefix)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    token = tokenizer.decode(out[0, ids.shape[1]:])
    return options.index(token) if token in options else -1


def baseline_judge(model, tokenizer, judge, pairs, *, seed: int = 0) -> list[list[int]]:
    """For each pair (prompt, a, b) and each principle cai_fast's `judge` would ask: 1 if a is
    preferred, 0 if b is, -1 if the verdict could not be parsed. One random order per pair."""
    rng = random.Random(seed)
    verdicts = []
    for prompt, a, b in pairs:
        conversation, a, b = P.conversation_text(prompt), response_text(a).strip(), response_text(b).strip()
        flip = rng.random() < 0.5
        first, second = (b, a) if flip else (a, b)
        row = []
        for principle in judge.principles_for(conversation, a, b):
            verdict = _verdict(model, tokenizer, judge.judge_chat(conversation, first, second, principle),
                               judge.options.prefix, judge.options.options)
            row.append(-1 if verdict < 0 else int(verdict == (1 if flip else 0)))
        verdicts.append(row)
    return verdicts
