"""Reward model: the policy's backbone with a scalar head, trained on (soft) preference labels.

    train_reward_model(RewardConfig(model=..., data=..., out=...)) -> TrainResult
    load_reward_model(out) -> RewardScorer: scorer(prompts, responses) -> list[float]

A transformers sequence classifier with one label, the format trl's RewardTrainer writes and reads (`RewardModel`),
trained with the fused soft-label Bradley–Terry loss ℓ = −[p·log σ(d) + (1 − p)·log σ(−d)], d = r_chosen − r_rejected
(− margin, with --use-margin 1), p = the record's `p_chosen` (1 when absent: a hard label). A held-out share of the
pairs (`eval_fraction`, a seeded split) is scored at the end and every `eval_steps` steps (see `evaluate_pairs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..engine.loading import ModelLoadError, load_tokenizer, require_peft, resolve_model_path
from ..ops import reward_bt_loss
from .common import (
    TrainResult, TrainRun, check_reward_model, global_batch_size, local_examples, placement, prepare_for_training,
    start_run, step_indices, steps_for, training_examples, unwrapped, with_lora,
)
from .config import RewardConfig
from .data import PreferencePair, TokenBatch, TokenizedChat, chat_ids, tokenize_preference
from .distributed import gather_shards, shard_for_process

class RewardModel(nn.Module):
    """A transformers sequence classifier with one label (or a peft model of one), seen as

    forward(input_ids [B, T], attention_mask [B, T], right-padded) -> h [B, H] at each row's last
    token, or with head_fn -> head_fn(model, h), called inside forward (where FSDP has gathered the
    head, as PolicyModule's); `head` the Linear(H, 1) score head; `rewards(...)` -> head(h) [B].
    Training applies the head inside `reward_bt_loss`.

    The classifier is `<Arch>ForSequenceClassification`, num_labels=1, a bias-free `score` head: the
    format trl's RewardTrainer writes and its `reward_funcs="<folder>"` reads; `--model` may be a
    causal LM (the head starts at random) or such a classifier (a trl reward model trains on). The
    reward of a conversation is score(h), h the final hidden state at its last token as transformers
    takes it (the rightmost non-pad token) of "prompt + response" rendered by the chat template. The
    saved folder loads with `AutoModelForSequenceClassification.from_pretrained` and scores alike
    there, in trl and in `load_reward_model` (none of which truncates what it scores); with LoRA it
    holds the adapter (the `score` head saved whole) unless --merge-lora 1.
    """

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    @property
    def inner(self):
        """The transformers model (inside its peft wrapper, if any)."""
        c = self.classifier
        return c.get_base_model() if hasattr(c, "get_base_model") else c

    @property
    def head(self) -> nn.Linear:
        return self.inner.score

    def forward(self, input_ids, attention_mask, head_fn=None):
        inner = self.inner
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = last_token_index(input_ids, attention_mask, inner.config.pad_token_id)
        h = hidden[torch.arange(len(last), device=hidden.device), last]
        return h if head_fn is None else head_fn(self, h)

    @torch.no_grad()
    def rewards(self, input_ids, attention_mask) -> torch.Tensor:
        """[B] fp32 rewards, the head applied in fp32 whatever the model's dtype."""
        def head_fn(model, h):
            bias = None if model.head.bias is None else model.head.bias.float()
            return nn.functional.linear(h.float(), model.head.weight.float(), bias)[:, 0]

        return self(input_ids, attention_mask, head_fn)


def last_token_index(input_ids, attention_mask, pad_id: int | None) -> torch.Tensor:
    """[B] index of each row's last token as transformers' sequence classifiers pool it: the
    rightmost token that is not pad_id (the attention mask's last one when there is no pad_id)."""
    if pad_id is None:
        return attention_mask.sum(dim=1) - 1
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(dim=1)


def load_classifier(name: str, tokenizer, dtype=None):
    """A one-label sequence classifier of `name` (a causal LM gets a new head, std initializer_range),
    its config's pad_token_id the tokenizer's. A LoRA adapter folder (of a reward model or of a
    policy) loads merged into its base model."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name)
    adapter = Path(path) / "adapter_config.json"
    try:
        if adapter.is_file():  # a reward model's adapter, or a policy's (an SFT run with LoRA)
            peft = require_peft()
            settings = peft.PeftConfig.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(settings.base_model_name_or_path), num_labels=1, dtype=dtype, trust_remote_code=False,
                use_safetensors=True)
            if settings.task_type != "SEQ_CLS":  # a policy's adapter: only its backbone part applies
                settings.task_type = None
            model = peft.PeftModel.from_pretrained(model, path, config=settings).merge_and_unload()
            model.requires_grad_(True)  # peft froze the base weights
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype,
                                                                       trust_remote_code=False, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load {name!r} as a reward model: {err}") from err
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def pair_loss(module, pairs: Sequence[PreferencePair], pad_id: int, device, use_margin: bool):
    """(summed soft-label BT loss, r_chosen [B], r_rejected [B]) of a batch of pairs."""
    batch = TokenBatch.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)
    p = torch.tensor([x.p_chosen for x in pairs], device=device)
    margin = torch.tensor([x.margin for x in pairs], device=device) if use_margin else None
    n = len(pairs)

    def head_fn(model, h):
        return reward_bt_loss(h[:n], h[n:], model.head.weight, model.head.bias, p, margin, reduction="sum")

    return module(batch.input_ids, batch.attention_mask, head_fn)


def preference_accuracy(r_chosen, r_rejected, p) -> tuple[float, int]:
    """(share of pairs with p ≠ ½ whose reward order matches p > ½, number of such pairs)."""
    decided = p != 0.5
    agree = ((r_chosen - r_rejected) > 0) == (p > 0.5)
    n = int(decided.sum())
    return (float(agree[decided].float().mean()) if n else float("nan")), n


def calibration(predicted: torch.Tensor, p: torch.Tensor, bins: int = 10) -> dict:
    """Brier score and expected calibration error of predicted P(chosen ≻ rejected) against p."""
    index = (predicted * bins).long().clamp(max=bins - 1)
    ece = sum((index == b).sum() / len(p) * (predicted[index == b].mean() - p[index == b].mean()).abs()
              for b in range(bins) if (index == b).any())
    return {"brier": float(((predicted - p) ** 2).mean()), "ece": float(ece)}


def evaluate_pairs(model: RewardModel, pairs: Sequence[PreferencePair], pad_id: int, device,
                   use_margin: bool, batch_size: int, sharded: bool = False) -> dict:
    """Loss, accuracy and calibration of the reward model on held-out pairs (all processes; each scores its
    share, or every pair when the model is `sharded` with FSDP, whose every forward all processes must run):

      accuracy  share of pairs whose reward order agrees with the label's majority (p > ½; pairs
                with p = ½ are left out), i.e. r_chosen > r_rejected for hard labels;
      brier     mean (σ(d) − p)², the calibration of the predicted preference against the soft label;
      ece       expected calibration error of σ(d) against p over 10 equal-width bins of σ(d).
    """
    local = list(pairs) if sharded else shard_for_process(pairs)
    rows = []
    with torch.no_grad():
        for i in range(0, len(local), batch_size):
            chunk = local[i : i + batch_size]
            _, r_c, r_r = pair_loss(model, chunk, pad_id, device, use_margin)
            rows += [(c, r, x.p_chosen, x.margin if use_margin else 0.0)
                     for c, r, x in zip(r_c.tolist(), r_r.tolist(), chunk)]
    r_c, r_r, p, margin = torch.tensor(rows if sharded else gather_shards(rows)).T
    d = r_c - r_r - margin
    accuracy, decided = preference_accuracy(r_c, r_r, p)
    loss = -(p * nn.functional.logsigmoid(d) + (1 - p) * nn.functional.logsigmoid(-d)).mean()
    return {"eval_loss": float(loss), "eval_accuracy": accuracy, "eval_pairs": len(p),
            "eval_decided_pairs": decided, **{f"eval_{k}": v for k, v in calibration(torch.sigmoid(d), p).items()}}


def held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded split, at least one pair each way when asked."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 else 0
    return sorted(order[k:]), sorted(order[:k])


def train_reward_model(config: RewardConfig, *, progress: bool = True) -> TrainResult:
    done = start_run(config, "reward")
    if done:
        return done
    tokenizer = load_tokenizer(config.model)
    classifier = prepare_for_training(load_classifier(config.model, tokenizer, placement(config).trained), config)
    model = RewardModel(with_lora(classifier, config, "SEQ_CLS"))
    pairs = training_examples(config, "preference", tokenizer, tokenize_preference)
    train_ids, eval_ids = held_out_split(len(pairs), config.eval_fraction, config.seed)
    train, held_out = [pairs[i] for i in train_ids], [pairs[i] for i in eval_ids]
    global_batch = global_batch_size(config)
    run = TrainRun(config, "reward", model, steps_for(config, len(train), global_batch), progress=progress)

    def loss_fn(module, chunk):
        loss, r_c, r_r = pair_loss(module, chunk, tokenizer.pad_token_id, run.device, bool(config.use_margin))
        margin = (r_c - r_r).detach()
        return loss, {"loss": loss.detach(), "correct": (margin > 0).sum(), "margin": margin.sum()}

    def step(k: int) -> dict:
        indices = step_indices(len(train), global_batch, k, config.seed)
        sums = run.accumulated_step(local_examples(train, indices), len(indices), loss_fn)
        metrics = {"loss": sums["loss"] / len(indices), "accuracy": sums["correct"] / len(indices),
                   "reward_margin": sums["margin"] / len(indices), "grad_norm": sums["grad_norm"]}
        if held_out and config.eval_steps and (k + 1) % config.eval_steps == 0:
            model = unwrapped(run.module).eval()
            metrics.update(evaluate_pairs(model, held_out, tokenizer.pad_token_id, run.device, config.use_margin,
                                          config.batch_size, bool(run.sharding)))
            model.train()
        return metrics

    run.run(step, "reward model")
    trained = unwrapped(run.module).eval()
    scores = evaluate_pairs(trained, held_out, tokenizer.pad_token_id, run.device, bool(config.use_margin),
                            config.batch_size, bool(run.sharding)) if held_out else {}
    return run.finish(trained.classifier, tokenizer, {"train_pairs": len(train), **scores})


class RewardScorer:
    """Scores (prompt, response) pairs: prompt a string (one user turn) or a list of messages,
    response the assistant's reply as a string. `scorer(prompts, responses) -> list[float]`."""

    def __init__(self, model: RewardModel, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device  # where the inputs go, also once the model is sharded

    def __call__(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt")
        chats = [self.chat_ids(p, r) for p, r in zip(prompts, responses)]
        scores = []
        for i in range(0, len(chats), self.batch_size):
            batch = TokenBatch.collate(chats[i : i + self.batch_size], self.tokenizer.pad_token_id, self.device)
            scores += self.model.rewards(batch.input_ids, batch.attention_mask).tolist()
        return scores

    def chat_ids(self, prompt, response: str):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = chat_ids(self.tokenizer, messages + [{"role": "assistant", "content": response}])
        return TokenizedChat(ids, [False] * len(ids))


def load_reward_model(path: str | Path, device: str = "cpu", batch_size: int = 8,
                      dtype: torch.dtype | None = None) -> RewardScorer:
    """A reward model as a scorer: a folder from `cai-fast train reward` or trl's RewardTrainer
    (any one-label sequence classifier), or a LoRA adapter of one; loaded in `dtype` (None: as
    saved), its scores fp32."""
    check_reward_model(Path(path))
    tokenizer = load_tokenizer(str(path))
    model = RewardModel(load_classifier(str(path), tokenizer, dtype)).to(device)
    return RewardScorer(model, tokenizer, batch_size)
