"""The plain SL-CAI loop every speed figure is compared to.

Written the way the seed documents and most hand-made critique loops are: one prompt at a time,
one `model.generate` call per step, the whole conversation re-encoded and recomputed each time,
nothing shared between prompts. It uses cai_fast's templates and principle sampling so that it
does exactly the same work as the package; only the way the work is run differs.
"""

from __future__ import annotations

import torch

from cai_fast.data import prompts as P


@torch.inference_mode()
def _reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[str, int]:
    ids = torch.tensor([P.render(tokenizer, messages)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=[tokenizer.eos_token_id], temperature=None, top_p=None, top_k=None)
    new = out[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new)


def baseline_sl_cai(model, tokenizer, constitution, prompts, *, rounds: int, seed: int, few_shot: int,
                    answer_tokens: int, critique_tokens: int, revision_tokens: int) -> tuple[list[dict], int]:
    """Greedy SL-CAI, one prompt and one call at a time. Returns (records, generated tokens)."""
    records, generated = [], 0
    for prompt in prompts:
        chat = P.few_shot_messages(constitution, few_shot) + [P.user(prompt.text)]
        initial, n = _reply(model, tokenizer, chat, answer_tokens)
        generated += n
        chat.append(P.assistant(initial))
        trace = []
        for principle in constitution.sample(prompt.id, rounds, seed=seed):
            chat.append(P.critique_turn(principle))
            critique, n1 = _reply(model, tokenizer, chat, critique_tokens)
            chat += [P.assistant(critique), P.revision_turn(principle)]
            revision, n2 = _reply(model, tokenizer, chat, revision_tokens)
            chat.append(P.assistant(revision))
            generated += n1 + n2
            trace.append({"principle_id": principle.id, "critique": critique, "revision": revision})
        records.append({"prompt_id": prompt.id, "initial": initial, "rounds": trace,
                        "final": trace[-1]["revision"]})
    return records, generated
