"""PPO against a reward model (RL-CAI) or the judge's direct score (d-RLAIF): small, and every step on the page.

    train_ppo(PPOConfig(model=SFT policy, reward_model=..., data=prompts, out=...)) -> TrainResult
    train_ppo(PPOConfig(model=SFT policy, reward_source="judge", judge_model=..., data=prompts, out=...))

One step (in full: `PPOTrainer`): rollouts, one response per prompt sampled from the current policy
(`make_generator`); scoring without gradients (the reward model's score, or the judge's direct score; log π_old,
V and log π_ref per response token); rewards −kl_coef·k1 per token plus the score on the last token, GAE
advantages and returns; then `ppo_epochs` passes of the clipped policy and value losses over `minibatches`
minibatches. The value function is a Linear(H, 1) head on the policy's own final hidden states. Metrics are
logged per step to OUT/metrics.jsonl. Under FSDP the policy, a reference loaded apart and the reward model are
sharded; the engine samples from an unsharded copy of the policy, and the judge (d-RLAIF) runs unsharded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..data import load_prompts
from ..engine import LoadedModel, SamplingParams, make_generator
from ..engine.device import dtype_name
from ..data.prompts import render, user
from ..seeding import stable_seed
from .common import (
    PolicyModule, TrainResult, TrainRun, global_batch_size, load_policy, load_reference, local_examples,
    placement, sharding, start_run, step_indices, steps_for, token_logprobs, unwrapped,
)
from .config import PPOConfig
from .data import TokenBatch, TokenizedChat
from .distributed import full_state_dict, is_sharded, process_state
from .reward import load_reward_model

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]


# The pieces, on plain tensors -------------------------------------------------------------------

def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(π ‖ π_ref) at each sampled token: log π(y_t) − log π_ref(y_t)."""
    return logp - ref_logp


def per_token_kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π ‖ π_ref) at each sampled token: (ρ − 1) − log ρ, ρ = π_ref(y_t) / π(y_t).
    Never negative (x − 1 ≥ log x), with the same expectation as k1 under tokens drawn from π."""
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


def judge_reward(config: PPOConfig, device: str, dtype: str) -> tuple[RewardFn, dict]:
    """(scorer, its description) of d-RLAIF: `judge_model`'s direct score of each response
    (JudgeReward(mode="score"): 1..9, averaged over `judge_principles` principles of `constitution`)
    minus the scale's midpoint, so a neither-good-nor-bad response scores 0 as a reward model's would
    and the value head does not start 5 away from its returns; the judge on the stage's device, in
    its frozen dtype, on the cached engine."""
    from ..engine import open_generator
    from ..labelling.judge import ConstitutionalJudge
    from ..labelling.judge_config import SCORES, JudgeConfig
    from ..labelling.trl_compat import JudgeReward

    model = config.judge_model or config.model
    judge_config = JudgeConfig(principles=config.judge_principles, batch_size=config.generation_batch,
                               seed=config.seed)
    judge = ConstitutionalJudge(open_generator(model, batch_size=config.generation_batch, device=device, dtype=dtype),
                                config.constitution, judge_config)
    score, midpoint = JudgeReward(judge, mode="score"), (SCORES[0] + SCORES[-1]) / 2
    about = {"source": "judge", "judge_model": model, "constitution": judge.constitution.name,
             "principles": config.judge_principles, "offset": -midpoint, "read": judge.score_layout.describe()}
    return (lambda prompts, responses: [s - midpoint for s in score(prompts, responses)]), about


def token_rewards(score: float, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Rewards of one response [R]: −kl_coef·kl_t, plus the score on the last token."""
    rewards = -kl_coef * kl
    rewards[-1] += score
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns) [R] of one response; the value after its last token is 0.

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  R_t = A_t + V_t.
    """
    advantages = torch.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(values) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return (x - x.mean()) / (x.std(unbiased=False) + eps) if len(x) > 1 else x - x.mean()


def clipped_policy_loss(logp, old_logp, advantages, clip: float):
    """Per-token max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) and whether the clipped term won."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values, old_values, returns, clip: float):
    """Per-token ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


# The trainer ----------------------------------------------------------------------------------

class PolicyWithValue(PolicyModule):
    """A PolicyModule plus a value head on the same final hidden states: values(h) -> [n]."""

    def __init__(self, lm):
        super().__init__(lm)
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n] fp32 values; the head keeps fp32 weights whatever the policy's dtype."""
        return self.value_head(hidden.to(self.value_head.weight.dtype))[:, 0].float()


@dataclass
class Rollout:
    chat: TokenizedChat  # prompt + response, the response marked
    old_logp: torch.Tensor  # [R]
    old_values: torch.Tensor  # [R]
    advantages: torch.Tensor  # [R], whitened
    returns: torch.Tensor  # [R]


class PPOTrainer:
    """Holds the policy (+ value head), the reference, the reward (model or judge) and the prompts.

    One step:
     1. Rollouts. Each process takes its share of the step's prompts (`shard_for_process`) and samples
        one response each from the current policy through `make_generator` (the prefix-cached engine
        by default; a LoRA policy runs as its base model, whose modules carry the adapters), at
        `temperature`, top-p 1. A response that ended itself keeps its end-of-turn token (the
        tokenizer's eos), so stopping is an action that gets credit too.
     2. Scoring, without gradients. The reward model scores (prompt, response text), or with
        reward_source="judge" the judge's direct score does (`judge_reward`). The policy, its
        value head and the frozen reference give, per response token t, log π_old(y_t), V(s_t) and
        log π_ref(y_t) — log-probs from `linear_logprobs` at the sampling temperature.
     3. Rewards: r_t = −kl_coef·k1_t with k1_t = log π_old(y_t) − log π_ref(y_t) (the per-token KL
        estimator), plus the score on the last token. GAE(γ, λ) gives advantages A_t
        (whitened over the process's tokens) and returns R_t = A_t + V_t.
     4. `ppo_epochs` passes over the rollouts in `minibatches` shuffled minibatches, one optimizer
        step each (accumulated over `grad_accum` micro-batches of `batch_size`), minimising per token
            clipped policy loss  max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)),  ρ = π(y_t) / π_old(y_t)
          + vf_coef · clipped value loss  ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)
        averaged over the minibatch's tokens.
    The value loss also trains the shared backbone, as in trl's original PPO.

    Logged per step to OUT/metrics.jsonl: reward (mean score: the reward model's, or the direct score − 5), kl (mean
    Σ_t k1_t per response: the estimate the penalty uses, unbiased but negative on some steps), kl_k3 (mean Σ_t k3_t
    per response, k3_t = (ρ_t − 1) − log ρ_t with ρ_t = π_ref(y_t) / π_old(y_t): unbiased too, and never negative,
    so its curve reads as a distance), non_score_reward, entropy, clipfrac, value_loss, pg_loss, approx_kl, ratio,
    response_length, grad_norm, lr. `entropy` is the Monte-Carlo estimate −mean log π_old(y_t) over the sampled
    tokens: unbiased for the per-token entropy of the sampling distribution (the tokens are drawn from it), without
    the full [tokens × vocab] distribution.
    """

    def __init__(self, config: PPOConfig, *, progress: bool = True):
        self.config = config
        lm, self.tokenizer = load_policy(config)
        # under FSDP the engine samples from an unsharded copy, given the gathered weights every step
        self.rollout_lm = copy.deepcopy(lm).requires_grad_(False).eval() if sharding(config) else None
        self.prompts = self._load_prompts()
        self.per_step = global_batch_size(config) * config.minibatches
        steps = steps_for(config, len(self.prompts), self.per_step)
        self.run = TrainRun(config, "ppo", PolicyWithValue(lm), steps, progress=progress,
                            optimizer_steps=steps * config.ppo_epochs * config.minibatches)
        self.reference = self.run.frozen(load_reference(config, self.run.module, self.run.device))
        if self.rollout_lm is not None:
            self.rollout_lm.to(self.run.device)
        frozen = placement(config).frozen
        if config.reward_source == "judge":
            self.scorer, self.reward_about = judge_reward(config, str(self.run.device), dtype_name(frozen))
            if self.run.sharding and self.run.is_main:
                print("cai-fast: the judge (--reward-source judge) runs unsharded in every process: the cached "
                      "engine needs a model's whole weights", flush=True)
        else:  # sharded like the policy under FSDP: every process scores its equal share, so all run each forward
            self.scorer = load_reward_model(config.reward_model, device=str(self.run.device), dtype=frozen)
            self.scorer.model = self.run.frozen(self.scorer.model.requires_grad_(False))
            self.reward_about = {"source": "model", "reward_model": config.reward_model,
                                 "sharded": is_sharded(self.scorer.model)}

    def _load_prompts(self) -> list[tuple[str, list[int]]]:
        """(text, rendered ids) of the prompts that leave room for a full response within max_length."""
        rendered = [(p.text, render(self.tokenizer, [user(p.text)])) for p in load_prompts(self.config.data)]
        room = self.config.max_length - self.config.max_new_tokens
        kept = [(text, ids) for text, ids in rendered if len(ids) <= room]
        if len(kept) < len(rendered) and process_state().is_main_process:
            print(f"cai-fast: {len(rendered) - len(kept)} prompts longer than max_length - max_new_tokens = "
                  f"{room} tokens are left out", flush=True)
        if not kept:
            raise ValueError(f"{self.config.data}: no prompt fits in max_length - max_new_tokens = {room} tokens")
        return kept

    @property
    def policy(self) -> PolicyWithValue:
        return unwrapped(self.run.module)

    def generator(self):
        """A generator over the current policy weights (made per step: a cache of old weights'
        KV must not outlive them). A LoRA policy runs as its base model: peft puts the adapters
        into the base model's own modules, which the cached engine calls. Under FSDP (every process
        calls it) the policy's weights are gathered into the unsharded rollout copy first."""
        lm = self.policy.lm
        if self.rollout_lm is not None:
            self.rollout_lm.load_state_dict(full_state_dict(lm, everywhere=True))
            lm = self.rollout_lm
        model = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        return make_generator(LoadedModel(model, self.tokenizer, self.config.model), engine=self.config.engine,
                              batch_size=self.config.generation_batch)

    def sample(self, prompts: Sequence[list[int]], step: int) -> tuple[list[TokenizedChat], list[str]]:
        """One response per prompt from the current policy: (prompt + response chats, texts)."""
        seed = stable_seed(self.config.seed, "rollout", step, process_state().process_index)
        params = SamplingParams(self.config.max_new_tokens, self.config.temperature, 1.0, seed)
        self.policy.lm.eval()
        completions = self.generator().generate(prompts, params)
        self.policy.lm.train()
        chats = []
        for ids, c in zip(prompts, completions):
            response = c.token_ids + ([self.tokenizer.eos_token_id] if c.finish_reason == "stop" else [])
            chats.append(TokenizedChat(list(ids) + response, [False] * len(ids) + [True] * len(response)))
        return chats, [c.text for c in completions]

    @torch.no_grad()
    def score(self, chats: Sequence[TokenizedChat]):
        """Per-token (log π_old, V_old, log π_ref) of each response, each a list of [R] tensors."""
        out = ([], [], [])
        pad, lengths = self.tokenizer.pad_token_id, [c.trained_tokens for c in chats]
        for i in range(0, len(chats), self.config.batch_size):
            batch = TokenBatch.collate(chats[i : i + self.config.batch_size], pad, self.run.device)
            logp, _, values = token_logprobs(self.policy, batch, self.config.temperature, values=True)
            ref_logp, _, _ = token_logprobs(self.reference, batch, self.config.temperature)
            split = lengths[i : i + self.config.batch_size]
            for store, x in zip(out, (logp, values, ref_logp)):
                store += list(torch.split(x, split))
        return out

    def rollouts(self, prompts: Sequence[tuple[str, list[int]]], step: int):
        """(rollouts, summed statistics) for this process's (text, ids) prompts."""
        chats, responses = self.sample([ids for _, ids in prompts], step)
        scores = self.scorer([text for text, _ in prompts], responses)
        old_logp, old_values, ref_logp = self.score(chats)
        c = self.config
        stats = {"reward": 0.0, "kl": 0.0, "kl_k3": 0.0, "non_score_reward": 0.0, "neg_logp": 0.0, "tokens": 0.0,
                 "responses": float(len(chats))}
        advantages, returns = [], []
        for score, logp, values, ref in zip(scores, old_logp, old_values, ref_logp):
            kl = per_token_kl(logp, ref)
            a, r = gae(token_rewards(score, kl, c.kl_coef), values, c.gamma, c.lam)
            advantages.append(a)
            returns.append(r)
            stats["reward"] += score
            stats["kl"] += float(kl.sum())
            stats["kl_k3"] += float(per_token_kl_k3(logp, ref).sum())
            stats["non_score_reward"] -= c.kl_coef * float(kl.sum())
            stats["neg_logp"] -= float(logp.sum())
            stats["tokens"] += len(logp)
        lengths = [len(a) for a in advantages]
        advantages = torch.split(whiten(torch.cat(advantages)), lengths)
        return [Rollout(*row) for row in zip(chats, old_logp, old_values, advantages, returns)], stats

    def loss(self, module, rollouts: Sequence[Rollout]):
        """(summed PPO loss over the rollouts' tokens, summed statistics)."""
        c = self.config
        batch = TokenBatch.collate([r.chat for r in rollouts], self.tokenizer.pad_token_id, self.run.device)
        logp, _, values = token_logprobs(module, batch, c.temperature, values=True)
        old_logp, old_values, advantages, returns = (
            torch.cat([getattr(r, name) for r in rollouts]).to(self.run.device)
            for name in ("old_logp", "old_values", "advantages", "returns"))
        pg, clipped = clipped_policy_loss(logp, old_logp, advantages, c.clip_range)
        vf = clipped_value_loss(values, old_values, returns, c.value_clip_range)
        log_ratio = (logp - old_logp).detach()
        stats = {"pg_loss": pg.detach().sum(), "value_loss": vf.detach().sum(), "clipfrac": clipped.sum(),
                 "approx_kl": (0.5 * log_ratio**2).sum(), "ratio": log_ratio.exp().sum()}
        return pg.sum() + c.vf_coef * vf.sum(), stats

    def update(self, rollouts: Sequence[Rollout], step: int) -> dict:
        """ppo_epochs × minibatches optimizer steps; per-token means of the loss statistics."""
        c, run = self.config, self.run
        size = len(rollouts) // c.minibatches
        generator = torch.Generator().manual_seed(stable_seed(c.seed, "minibatch", step, run.accelerator.process_index))
        totals, updates = {}, 0
        for _ in range(c.ppo_epochs):
            order = torch.randperm(len(rollouts), generator=generator).tolist()
            for m in range(c.minibatches):
                local = [rollouts[i] for i in order[m * size : (m + 1) * size]]
                tokens = run.sum_over_processes({"tokens": float(sum(len(r.old_logp) for r in local))})["tokens"]
                sums = run.accumulated_step(local, tokens, self.loss)
                for name, value in sums.items():
                    totals[name] = totals.get(name, 0.0) + (value if name == "grad_norm" else value / tokens)
                updates += 1
        return {name: value / updates for name, value in totals.items()}

    def step(self, k: int) -> dict:
        indices = step_indices(len(self.prompts), self.per_step, k, self.config.seed)
        rollouts, stats = self.rollouts(local_examples(self.prompts, indices), k)
        stats = self.run.sum_over_processes(stats)
        n, tokens = stats["responses"], stats["tokens"]
        return {"reward": stats["reward"] / n, "kl": stats["kl"] / n, "kl_k3": stats["kl_k3"] / n,
                "non_score_reward": stats["non_score_reward"] / n,
                "entropy": stats["neg_logp"] / tokens, "response_length": tokens / n, **self.update(rollouts, k)}

    def train(self) -> TrainResult:
        self.run.run(self.step, "PPO")
        return self.run.finish(self.policy.lm, self.tokenizer, {"prompts": len(self.prompts),
                                                                "reward": self.reward_about})


def train_ppo(config: PPOConfig, *, progress: bool = True) -> TrainResult:
    done = start_run(config, "ppo")
    return done or PPOTrainer(config, progress=progress).train()
