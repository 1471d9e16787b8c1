"""PPO: GAE, clipping and KL against hand-worked values; an update lowers its loss; a full run logs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cai_fast.engine import LoadedModel, SamplingParams, load_model, make_generator
from cai_fast.train.config import PPOConfig
from cai_fast.train.ppo import (
    PPOTrainer, clipped_policy_loss, clipped_value_loss, gae, per_token_kl, per_token_kl_k3, token_rewards, train_ppo,
    whiten,
)


def test_gae_on_a_hand_worked_sequence():
    rewards, values = torch.tensor([0.5, -0.2, 1.0]), torch.tensor([0.4, 0.1, 0.3])
    advantages, returns = gae(rewards, values, gamma=0.9, lam=0.8)
    # δ2 = 1.0 − 0.3 = 0.7                    A2 = 0.7
    # δ1 = −0.2 + 0.9·0.3 − 0.1 = −0.03       A1 = −0.03 + 0.72·0.7 = 0.474
    # δ0 = 0.5 + 0.9·0.1 − 0.4 = 0.19         A0 = 0.19 + 0.72·0.474 = 0.53128
    assert advantages.tolist() == pytest.approx([0.53128, 0.474, 0.7], abs=1e-6)
    assert returns.tolist() == pytest.approx([0.93128, 0.574, 1.0], abs=1e-6)
    one, _ = gae(torch.tensor([2.0]), torch.tensor([0.5]), gamma=1.0, lam=0.95)
    assert one.tolist() == pytest.approx([1.5])


def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    rewards, values = torch.randn(7), torch.randn(7)
    advantages, returns = gae(rewards, values, gamma=0.8, lam=1.0)
    discounted = [sum(0.8 ** (k - t) * float(rewards[k]) for k in range(t, 7)) for t in range(7)]
    assert returns.tolist() == pytest.approx(discounted, abs=1e-5)


def test_clipped_policy_loss_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, 1.0, -2.0, -2.0, 0.5])
    old = torch.randn(5)
    losses, clipped = clipped_policy_loss(old + ratio.log(), old, advantages, clip=0.2)
    # A>0, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped)   A>0, ρ=0.5: max(−0.5, −0.8) = −0.5
    # A<0, ρ=1.5: max(3.0, 2.4) = 3.0                A<0, ρ=0.5: max(1.0, 1.6) = 1.6 (clipped)
    # ρ=1.1 inside the range: −0.55 either way
    assert losses.tolist() == pytest.approx([-1.2, -0.5, 3.0, 1.6, -0.55], abs=1e-6)
    assert clipped.tolist() == [True, False, False, True, False]


def test_clipped_value_loss_by_hand():
    losses = clipped_value_loss(torch.tensor([0.5, 0.9]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), clip=0.2)
    # 1: ½·max((0.5 − 1)², (0.2 − 1)²) = 0.32    2: ½·max(0.9², 0.9²) = 0.405
    assert losses.tolist() == pytest.approx([0.32, 0.405], abs=1e-6)


def test_per_token_kl_and_rewards_by_hand():
    kl = per_token_kl(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5]))
    assert kl.tolist() == [0.5, -1.0, 0.0]
    assert token_rewards(2.0, kl, kl_coef=0.1).tolist() == pytest.approx([-0.05, 0.1, 2.0])
    # the k1 estimator is unbiased: its mean over samples of π is KL(π ‖ π_ref)
    generator = torch.Generator().manual_seed(0)
    p, q = (torch.softmax(torch.randn(11, generator=generator), 0) for _ in range(2))
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    estimate = per_token_kl(p.log()[samples], q.log()[samples]).mean()
    assert float(estimate) == pytest.approx(float((p * (p / q).log()).sum()), abs=0.01)


def test_the_k3_kl_estimator_by_hand_never_negative_and_unbiased():
    # ρ = π_ref/π: 0.5 → (0.5 − 1) − log 0.5 = 0.193147;  e → (e − 1) − 1 = 0.718282;  1 → 0
    k3 = per_token_kl_k3(torch.tensor([0.5, 0.2, 0.3]).log(), torch.tensor([0.25, 0.2 * math.e, 0.3]).log())
    assert k3.tolist() == pytest.approx([0.193147, 0.718282, 0.0], abs=1e-5)
    generator = torch.Generator().manual_seed(1)
    p, q = (torch.softmax(torch.randn(11, generator=generator), 0) for _ in range(2))
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    k1, k3 = per_token_kl(p.log()[samples], q.log()[samples]), per_token_kl_k3(p.log()[samples], q.log()[samples])
    assert bool((k3 >= 0).all()) and bool((k1 < 0).any())  # the penalty's estimator goes negative, k3 never
    assert float(k3.mean()) == pytest.approx(float((p * (p / q).log()).sum()), abs=0.01)


def test_whiten_is_zero_mean_unit_variance():
    x = whiten(torch.randn(37) * 3 + 2)
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


@pytest.fixture(scope="module")
def reward_model_path(tiny_model_path, tmp_path_factory):
    """A reward model with a random head on the tiny backbone (PPO needs a score, not a good one),
    saved as transformers (and trl's RewardTrainer) save one."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    folder = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(folder)
    load_model(str(tiny_model_path), dtype="float32").tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(["Please rewrite the response", "identify ways the answer is unhelpful",
                               "Which response is better", "remove harmful content", "critique request",
                               "the answer is dishonest"]) + "\n")
    return path


def ppo_config(tiny_model_path, reward_model_path, prompts_file, out, **kw) -> PPOConfig:
    base = dict(model=str(tiny_model_path), reward_model=str(reward_model_path), data=str(prompts_file),
                out=str(out), lr=3e-3, batch_size=2, minibatches=2, max_new_tokens=7, temperature=1.0,
                save_every=0, max_steps=2, dtype="float32")  # reference = policy exactly (auto: a bf16 reference)
    return PPOConfig(**{**base, **kw})


def test_an_update_lowers_the_ppo_loss_on_its_rollouts(tiny_model_path, reward_model_path, prompts_file, tmp_path):
    trainer = PPOTrainer(ppo_config(tiny_model_path, reward_model_path, prompts_file, tmp_path, ppo_epochs=4),
                         progress=False)
    rollouts, stats = trainer.rollouts(trainer.prompts[:4], step=0)
    tokens = sum(len(r.old_logp) for r in rollouts)
    assert stats["tokens"] == tokens and stats["responses"] == 4 and stats["kl"] == 0.0  # π = π_ref

    def loss() -> float:
        with torch.no_grad():
            return float(trainer.loss(trainer.policy, rollouts)[0]) / tokens

    before = loss()
    metrics = trainer.update(rollouts, step=0)
    assert loss() < before - 0.01, (before, loss())
    assert {"pg_loss", "value_loss", "clipfrac", "approx_kl", "ratio", "grad_norm"} <= metrics.keys()
    assert 0.0 <= metrics["clipfrac"] <= 1.0


@pytest.mark.parametrize("engine", ["cached", "plain"])
def test_rollouts_are_sampled_from_the_policy_at_its_temperature(tiny_model_path, reward_model_path, prompts_file,
                                                                 tmp_path, engine):
    """On-policy check: over sampled tokens, mean −log π_T(y) estimates the entropy of π_T, which
    the tiny vocabulary lets us compute exactly. A sampler that truncates (top-k) or uses another
    temperature lands far off (a top-k of 50 gave 5.52 against 5.83)."""
    config = ppo_config(tiny_model_path, reward_model_path, prompts_file, tmp_path, engine=engine,
                        temperature=0.7, max_new_tokens=24)
    trainer = PPOTrainer(config, progress=False)
    chats, _ = trainer.sample([ids for _, ids in trainer.prompts] * 3, step=0)
    old_logp, _, _ = trainer.score(chats)
    entropies = []
    with torch.no_grad():
        for chat in chats:
            logits = trainer.policy.lm(input_ids=torch.tensor([chat.ids])).logits[0, :-1].float() / 0.7
            logp = torch.log_softmax(logits[torch.tensor(chat.mask[1:])], dim=-1)
            entropies.append(-(logp.exp() * logp).sum(-1))
    estimate, exact = -float(torch.cat(old_logp).mean()), float(torch.cat(entropies).mean())
    assert estimate == pytest.approx(exact, abs=0.08), (estimate, exact)


def test_a_lora_policy_generates_with_its_adapters(tiny_model_path, reward_model_path, prompts_file, tmp_path):
    trainer = PPOTrainer(ppo_config(tiny_model_path, reward_model_path, prompts_file, tmp_path, lora_r=4),
                         progress=False)
    torch.manual_seed(0)
    for name, p in trainer.policy.named_parameters():
        if "lora_B" in name:  # adapters start as a no-op; make them matter
            torch.nn.init.normal_(p, std=0.5)
    lm, prompts = trainer.policy.lm.eval(), [ids for _, ids in trainer.prompts]
    greedy = [c.token_ids for c in trainer.generator().generate(prompts, SamplingParams(max_new_tokens=8))]
    reference = make_generator(LoadedModel(lm, trainer.tokenizer, "peft"), engine="plain")
    assert greedy == [c.token_ids for c in reference.generate(prompts, SamplingParams(max_new_tokens=8))]
    with lm.disable_adapter():
        assert greedy != [c.token_ids for c in trainer.generator().generate(prompts, SamplingParams(max_new_tokens=8))]


def test_train_ppo_logs_every_step_and_saves_a_loadable_policy(tiny_model_path, reward_model_path, prompts_file,
                                                               tmp_path):
    result = train_ppo(ppo_config(tiny_model_path, reward_model_path, prompts_file, tmp_path / "run"), progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == result.history and [h["step"] for h in logged] == [1, 2]
    for key in ("reward", "kl", "entropy", "clipfrac", "value_loss", "pg_loss", "non_score_reward", "lr"):
        assert all(math.isfinite(h[key]) for h in logged), key
    assert logged[0]["kl"] == 0.0 == logged[0]["kl_k3"] and logged[1]["kl"] != 0.0  # the policy moved away
    assert logged[1]["kl_k3"] > 0
    assert 0 < logged[0]["entropy"] < math.log(load_model(str(tiny_model_path), dtype="float32").model.config.vocab_size) + 1
    assert 1 <= logged[0]["response_length"] <= 8
    load_model(str(tmp_path / "run"), dtype="float32")


def test_ppo_config_needs_a_reward_model():
    with pytest.raises(ValueError, match="--reward-model"):
        PPOConfig(data="red_team")


def test_ppo_on_the_judges_direct_score_runs_without_a_reward_model(tiny_model_path, prompts_file, tmp_path):
    """d-RLAIF: the judge (here the tiny model itself) scores the rollouts; the reward is its direct
    score − 5, and the summary says which reward drove PPO."""
    from cai_fast.engine import open_generator
    from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig

    config = ppo_config(tiny_model_path, "", prompts_file, tmp_path / "run", reward_source="judge", judge_principles=2,
                        max_steps=1)
    trainer = PPOTrainer(config, progress=False)
    texts = [text for text, _ in trainer.prompts[:2]]
    reference = open_generator(str(tiny_model_path), dtype="float32")  # the stage's dtype (auto: bf16 on some CPUs)
    judge = ConstitutionalJudge(reference, "default", JudgeConfig(principles=2, seed=config.seed))
    want = judge.rate(texts, ["a reply", "another reply"]).score - 5
    assert trainer.scorer(texts, ["a reply", "another reply"]) == pytest.approx(want.tolist(), abs=1e-4)
    result = trainer.train()
    assert math.isfinite(result.history[0]["reward"]) and -4 <= result.history[0]["reward"] <= 4
    assert result.summary["reward"]["source"] == "judge" and result.summary["reward"]["offset"] == -5
    assert result.summary["models"]["judge"]["dtype"] == "float32" and "reward_model" not in result.summary["models"]


@pytest.mark.parametrize("fields, message", [
    ({"reward_source": "judge", "reward_model": "rm"}, "drop --reward-model"),
    ({"reward_source": "human", "reward_model": "rm"}, "reward_source must be one of model, judge, got 'human'"),
    ({"reward_source": "judge", "judge_principles": 0}, "judge_principles must be >= 1"),
])
def test_ppo_reward_options_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(data="red_team", **fields)
