"""DPO on preference pairs, with the soft labels as the target: the RL-free alternative to PPO.

    train_dpo(DPOConfig(model=..., data=..., out=...)) -> TrainResult

For a pair (chosen c, rejected r) with soft label p = P(c ≻ r) (the record's `p_chosen`, 1 when absent), with
log π summed over the response tokens (`linear_logprobs`) and π_ref the frozen reference, the loss is
ℓ = −[p·log σ(β·Δ) + (1 − p)·log σ(−β·Δ)], Δ = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)], computed by
the fused `reward_bt_loss` (see `dpo_loss`). With p = 1 this is trl's DPOTrainer with loss_type="sigmoid"; a soft p
is per-pair label smoothing. Logged like trl: loss, reward_chosen / reward_rejected, accuracy, reward_margin.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..ops import reward_bt_loss
from .common import (
    PolicyModule, TrainResult, TrainRun, global_batch_size, load_policy, load_reference, local_examples,
    start_run, step_indices, steps_for, token_logprobs, training_examples, unwrapped,
)
from .config import DPOConfig
from .data import PreferencePair, TokenBatch, tokenize_preference


def sequence_logprobs(module, batch: TokenBatch) -> torch.Tensor:
    """Sum of the trained tokens' log-probs of each row, [B]."""
    logp, rows, _ = token_logprobs(module, batch)
    return torch.zeros(len(batch.input_ids), device=logp.device).index_add(0, rows, logp)


def dpo_loss(policy, reference, pairs: Sequence[PreferencePair], beta: float, pad_id: int, device):
    """(summed soft-label DPO loss, implicit rewards of chosen [B], of rejected [B]).

    The implicit rewards β·log π(y|x)/π_ref(y|x) go through the same fused `reward_bt_loss` as the
    reward model, as one-dimensional "hidden states" with a head of weight 1. With hard labels
    (p = 1) this is trl's DPOTrainer with loss_type="sigmoid" (checked in tests/test_train_dpo.py); a
    soft p is per-example label smoothing (the conservative-DPO target of trl's `label_smoothing`,
    per pair). Logged: reward_chosen / reward_rejected (mean implicit rewards), accuracy (implicit
    reward of chosen > rejected), reward_margin.
    """
    batch = TokenBatch.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)
    with torch.no_grad():
        reference_logp = sequence_logprobs(reference, batch)
    implicit = beta * (sequence_logprobs(policy, batch) - reference_logp)
    n = len(pairs)
    p = torch.tensor([x.p_chosen for x in pairs], device=device)
    unit_head = torch.ones(1, device=device)
    return reward_bt_loss(implicit[:n, None], implicit[n:, None], unit_head, None, p, reduction="sum")


def train_dpo(config: DPOConfig, *, progress: bool = True) -> TrainResult:
    done = start_run(config, "dpo")
    if done:
        return done
    lm, tokenizer = load_policy(config)
    pairs = training_examples(config, "preference", tokenizer, tokenize_preference)
    global_batch = global_batch_size(config)
    run = TrainRun(config, "dpo", PolicyModule(lm), steps_for(config, len(pairs), global_batch), progress=progress)
    reference = run.frozen(load_reference(config, run.module, run.device))

    def loss_fn(module, chunk):
        loss, r_c, r_r = dpo_loss(module, reference, chunk, config.beta, tokenizer.pad_token_id, run.device)
        r_c, r_r = r_c.detach(), r_r.detach()
        return loss, {"loss": loss.detach(), "reward_chosen": r_c.sum(), "reward_rejected": r_r.sum(),
                      "correct": (r_c > r_r).sum()}

    def step(k: int) -> dict:
        indices = step_indices(len(pairs), global_batch, k, config.seed)
        sums = run.accumulated_step(local_examples(pairs, indices), len(indices), loss_fn)
        mean = {name: sums[name] / len(indices) for name in ("loss", "reward_chosen", "reward_rejected")}
        return {**mean, "accuracy": sums["correct"] / len(indices),
                "reward_margin": mean["reward_chosen"] - mean["reward_rejected"], "grad_norm": sums["grad_norm"]}

    run.run(step, "DPO")
    return run.finish(unwrapped(run.module).lm, tokenizer, {"pairs": len(pairs)})
