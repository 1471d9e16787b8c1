"""trl accepts what the judge makes: the preference output trains DPOTrainer and RewardTrainer for a
step, and JudgeReward drives GRPOTrainer for a step; JudgeReward's round robin on a fake judge."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from cai_fast.data import prompts_from_texts
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig
from cai_fast.labelling import LabelConfig, run_labelling
from cai_fast.labelling.trl_compat import JudgeReward, response_text

pytestmark = pytest.mark.filterwarnings("ignore")
TRAIN = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], bf16=False, use_cpu=True,
             save_strategy="no", logging_steps=1, learning_rate=1e-3)


@pytest.fixture(scope="module")
def judge(tiny_loaded) -> ConstitutionalJudge:
    return ConstitutionalJudge(tiny_loaded, "default", JudgeConfig(principles=1, batch_size=8))


@pytest.fixture(scope="module")
def preference_file(judge, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    prompts = list(prompts_from_texts(["Hi there.", "How do I boil an egg?", "Write a short poem.", "Why?"]))
    run_labelling(judge, prompts, LabelConfig(samples=2, sample_tokens=8), out_dir=out, progress=False)
    return out / "preference" / "train-00000.jsonl"


def _dataset(path):
    from datasets import load_dataset

    dataset = load_dataset("json", data_files=str(path), split="train")
    assert len(dataset) >= 2, "the tiny model gave too few distinct pairs to train on"
    return dataset


def test_dpo_trainer_takes_the_labels_as_they_are(preference_file, tiny_model_path, tiny_loaded, tmp_path):
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path), max_length=512, **TRAIN),
                         train_dataset=_dataset(preference_file), processing_class=tiny_loaded.tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1 and torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_reward_trainer_takes_the_labels_and_their_margin(preference_file, tiny_model_path, tiny_loaded, tmp_path):
    """The rows train as they are: margin = 2·p − 1 in [0, 1], so the loss at near-equal rewards
    is at most log(1 + e) ≈ 1.31 (logit(p) margins started it near 13.8); the trained model then
    drives `cai-fast train ppo` as its reward model."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from cai_fast.cli import main

    dataset = _dataset(preference_file)
    assert dataset["margin"] == pytest.approx([2 * p - 1 for p in dataset["p_chosen"]])
    assert all(0 <= m <= 1 for m in dataset["margin"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path), max_length=512, **TRAIN),
                            train_dataset=dataset, processing_class=tiny_loaded.tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert torch.allclose(batch["margin"], torch.tensor(dataset["margin"][:2]))
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.state.log_history[0]["loss"] < 1.5
    trainer.save_model(str(tmp_path / "trl-reward"))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nName a colour.\n")
    ppo = ["train", "ppo", "--model", str(tiny_model_path), "--reward-model", str(tmp_path / "trl-reward"),
           "--data", str(prompts), "--out", str(tmp_path / "ppo"), "--max-steps", "1", "--batch-size", "2",
           "--max-new-tokens", "4", "--ppo-epochs", "1", "--save-every", "0", "--quiet"]
    assert main(ppo) == 0
    logged = json.loads((tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(logged["reward"])


class RecordingReward(JudgeReward):
    def __init__(self, judge, **options):
        super().__init__(judge, **options)
        self.calls = []

    def __call__(self, prompts, completions, **kwargs):
        rewards = super().__call__(prompts, completions, **kwargs)
        self.calls.append((prompts, completions, rewards))
        return rewards


def one_grpo_step(reward: RecordingReward, model_path, tokenizer, out):
    """One trl GRPO step of the tiny model on two prompts with `reward`: the trainer (reward.calls[0] holds
    what the reward was given and gave: prompts, completions, rewards)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = [[{"role": "user", "content": text}] for text in ("Say hi.", "Name a colour.")]
    args = GRPOConfig(output_dir=str(out), num_generations=2, max_completion_length=6, **TRAIN)
    trainer = GRPOTrainer(model=str(model_path), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                          processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 1 and reward.calls
    return trainer


def test_grpo_trainer_steps_with_the_judge_as_reward(judge, tiny_model_path, tiny_loaded, tmp_path):
    reward = RecordingReward(judge)
    one_grpo_step(reward, tiny_model_path, tiny_loaded.tokenizer, tmp_path)
    seen_prompts, completions, rewards = reward.calls[0]
    assert len(rewards) == len(completions) == len(seen_prompts) == 2 and seen_prompts[0] == seen_prompts[1]
    assert all(isinstance(r, float) for r in rewards)  # a group of two: P(win) against each other
    assert rewards[0] + rewards[1] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- JudgeReward on a fake judge


class LongerWins:
    """A fake judge: P(a ≻ b) = 0.8 when a is longer, 0.2 when shorter, 0.5 when equal."""

    def __init__(self):
        self.pairs = []

    def score(self, prompts, a, b):
        a, b = [response_text(x) for x in a], [response_text(x) for x in b]
        self.pairs += list(zip(a, b))
        return SimpleNamespace(label=[0.8 if len(x) > len(y) else 0.2 if len(x) < len(y) else 0.5
                                      for x, y in zip(a, b)])


def test_round_robin_rewards_within_each_prompts_group():
    judge = LongerWins()
    prompts = ["p", "q", "p", "p", "r", "q"]
    completions = ["aaa", "x", "a", "aa", "alone", ""]
    rewards = JudgeReward(judge)(prompts=prompts, completions=completions, trainer_state=None)
    # group p: aaa beats a and aa (0.8, 0.8); aa: 0.2 vs aaa, 0.8 vs a; a loses both
    assert rewards == pytest.approx([0.8, 1.0, 0.2, 0.5, None, 0.0])
    assert len(judge.pairs) == 3  # every pair of group p judged once; the empty one never


def test_reward_against_a_reference_column():
    judge = LongerWins()
    rewards = JudgeReward(judge, reference_column="reference")(
        prompts=["p", "q"], completions=[[{"role": "assistant", "content": "long one"}], "s"],
        reference=["mid", "mid"])
    assert rewards == pytest.approx([0.8, 0.2])
    with pytest.raises(ValueError, match="no dataset column 'reference' .*columns passed: solution"):
        JudgeReward(judge, reference_column="reference")(prompts=["p"], completions=["a"], solution=["b"])


def test_reward_function_carries_a_name_for_trl_logs():
    from trl.trainer.utils import get_callable_name

    assert get_callable_name(JudgeReward(LongerWins(), name="harmlessness")) == "harmlessness"
    json.dumps(JudgeReward(LongerWins())(prompts=["p", "p"], completions=["a", "bb"]))  # plain floats


def test_two_process_grpo_judges_whole_groups(tiny_model_path, tmp_path):
    """torchrun, 2 CPU processes (gloo), num_generations 2: each process holds one completion of
    each group, and still every completion gets a reward, the group's two summing to 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("grpo_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), str(tiny_model_path), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rewards-{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(run["calls"]) for run in runs] == [2, 2]
    for step in range(2):
        mine = [run["calls"][step] for run in runs]
        assert all(len(call["rewards"]) == 1 for call in mine)  # one completion of the group each
        assert mine[0]["prompts"] == mine[1]["prompts"]
        rewards = [call["rewards"][0] for call in mine]
        assert all(isinstance(r, float) for r in rewards) and sum(rewards) == pytest.approx(1.0, abs=1e-5)
    logged = runs[0]["logs"][0]
    assert "constitutional_judge/spread" in logged and "constitutional_judge/decisiveness" in logged


def test_round_robin_logs_spread_and_decisiveness():
    logged = {}
    rewards = JudgeReward(LongerWins())(prompts=["p", "p", "p", "q", "q"], completions=["aaa", "a", "aa", "b", "b"],
                                        log_metric=logged.__setitem__)
    assert rewards == pytest.approx([0.8, 0.2, 0.5, 0.5, 0.5])
    # group p: spread 0.8 − 0.2; group q: identical replies tie, spread 0; pairs |2P − 1|: 0.6 × 3, 0
    assert logged == pytest.approx({"constitutional_judge/spread": 0.3, "constitutional_judge/decisiveness": 0.45})
    against = {}
    JudgeReward(LongerWins(), reference_column="ref")(prompts=["p", "q"], completions=["aa", "a"], ref=["a", "aa"],
                                                      log_metric=against.__setitem__)
    assert against == pytest.approx({"constitutional_judge/win_rate": 0.5})


# ---------------------------------------------------------------- JudgeReward(mode="score") (d-RLAIF)


class LengthScore:
    """A fake direct-score judge: a response's score is its length, capped at 9."""

    def __init__(self):
        self.rated = []

    def rate(self, prompts, responses):
        texts = [response_text(r) for r in responses]
        self.rated += texts
        return SimpleNamespace(score=[float(min(len(t), 9)) for t in texts])


def test_score_mode_rewards_each_completion_by_its_direct_score():
    judge, logged = LengthScore(), {}
    rewards = JudgeReward(judge, mode="score")(
        prompts=["p", "p", "q"], completions=["aaa", "", [{"role": "assistant", "content": "aaaaaaaaaaaa"}]],
        log_metric=logged.__setitem__)
    assert rewards == [3.0, 1.0, 9.0]  # an empty completion gets the lowest score without asking the judge
    assert judge.rated == ["aaa", "aaaaaaaaaaaa"] and logged == {"constitutional_judge/spread": 2.0}


def test_score_mode_refuses_a_reference_column_and_unknown_modes_are_named():
    with pytest.raises(ValueError, match="mode='score' rates each completion on its own, so it takes no "
                                         "reference_column"):
        JudgeReward(LengthScore(), mode="score", reference_column="reference")
    with pytest.raises(ValueError, match="unknown mode 'direct'; modes: pairwise, score"):
        JudgeReward(LengthScore(), mode="direct")


def test_grpo_trainer_steps_with_the_direct_score_as_reward(judge, tiny_model_path, tiny_loaded, tmp_path):
    reward = RecordingReward(judge, mode="score", name="direct_score")
    trainer = one_grpo_step(reward, tiny_model_path, tiny_loaded.tokenizer, tmp_path)
    seen_prompts, completions, rewards = reward.calls[0]
    judged = [i for i, c in enumerate(completions) if response_text(c).strip()]
    want = judge.rate([seen_prompts[i] for i in judged], [completions[i] for i in judged]).score
    assert [rewards[i] for i in judged] == pytest.approx(want.tolist(), abs=1e-5)
    assert all(1.0 <= r <= 9.0 for r in rewards)
    assert any("rewards/direct_score/mean" in log for log in trainer.state.log_history)
