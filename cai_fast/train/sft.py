"""SFT: fine-tune a policy on chats, with the loss on assistant tokens only.

    train_sft(SFTConfig(model=..., data=..., out=...)) -> TrainResult

Data: trl's SFT formats (see cai_fast.train.data); an SL-CAI run folder is read from its `sft_messages/` subfolder.
The loss is the cross-entropy of every trained token (the assistant turns' content and end-of-turn tokens),
computed by `fused_linear_cross_entropy` from the final hidden states and the LM head — the [tokens × vocab] logits
never exist — and averaged over all trained tokens of the global batch. LoRA (`lora_r > 0`, saved as an adapter
unless `merge_lora`) or full fine-tuning; checkpoints and resume as in cai_fast.train.common; saved to `out`.
"""

from __future__ import annotations

from ..ops import fused_linear_cross_entropy
from .common import (
    PolicyModule, TrainResult, TrainRun, global_batch_size, load_policy, local_examples,
    start_run, step_indices, steps_for, training_examples, unwrapped,
)
from .config import SFTConfig
from .data import TokenBatch, tokenize_sft


def sft_loss(module, batch: TokenBatch):
    """Summed cross-entropy of the batch's trained tokens."""
    def head_fn(policy, hidden):
        hidden, targets, _ = batch.targets(hidden)
        weight, bias = policy.head()
        return fused_linear_cross_entropy(hidden, weight, targets, bias, reduction="sum")

    return module(batch.input_ids, batch.attention_mask, head_fn)


def train_sft(config: SFTConfig, *, progress: bool = True) -> TrainResult:
    done = start_run(config, "sft")
    if done:
        return done
    lm, tokenizer = load_policy(config)
    examples = training_examples(config, "sft_messages", tokenizer, tokenize_sft)
    global_batch = global_batch_size(config)
    run = TrainRun(config, "sft", PolicyModule(lm), steps_for(config, len(examples), global_batch),
                   progress=progress)

    def loss_fn(module, chats):
        loss = sft_loss(module, TokenBatch.collate(chats, tokenizer.pad_token_id, run.device))
        return loss, {"loss": loss.detach()}

    def step(k: int) -> dict:
        indices = step_indices(len(examples), global_batch, k, config.seed)
        tokens = sum(examples[i].trained_tokens for i in indices)
        sums = run.accumulated_step(local_examples(examples, indices), tokens, loss_fn)
        return {"loss": sums["loss"] / max(tokens, 1), "tokens": tokens, "grad_norm": sums["grad_norm"]}

    run.run(step, "SFT")
    return run.finish(unwrapped(run.module).lm, tokenizer, {"examples": len(examples)})

