"""Reward model: learns a planted preference, reports calibration, loads back as a scorer."""

from __future__ import annotations

import math

import pytest
import torch

from cai_fast.engine import load_model
from cai_fast.train.config import RewardConfig
from cai_fast.train.reward import (
    calibration, held_out_split, load_reward_model, preference_accuracy, train_reward_model,
)

from helpers.rows import MARKER, preference_rows, write_jsonl


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """A reward model trained on pairs whose chosen reply holds MARKER, soft label 0.9."""
    folder = tmp_path_factory.mktemp("reward")
    data = write_jsonl(folder / "pairs.jsonl", preference_rows(97, seed=2, p_chosen=0.9))
    config = RewardConfig(model=str(tiny_model_path), data=str(data), out=str(folder / "out"), lr=3e-3,
                          batch_size=8, max_steps=40, eval_fraction=0.25, save_every=0)
    return train_reward_model(config, progress=False)


def test_learns_the_planted_preference_to_high_held_out_accuracy(trained):
    s = trained.summary
    assert s["eval_pairs"] == 24 and s["train_pairs"] == 73
    assert s["eval_accuracy"] >= 0.9, s
    losses = [h["loss"] for h in trained.history]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.2, losses
    entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))  # the least loss a 0.9 label allows
    assert min(losses) > entropy - 1e-3
    assert s["eval_brier"] < 0.05 and 0 <= s["eval_ece"] < 0.2, s


def test_saved_model_scores_marker_replies_higher(trained):
    scorer = load_reward_model(trained.out)
    rows = preference_rows(12, seed=99)
    prompts = [r["prompt"] for r in rows] + [r["prompt"][0]["content"] for r in rows]
    chosen = [r["chosen"][0]["content"] for r in rows]
    rejected = [r["rejected"][0]["content"] for r in rows]
    good, bad = scorer(prompts, chosen + chosen), scorer(prompts, rejected + rejected)
    assert good[:12] == pytest.approx(good[12:], abs=1e-5)  # a string prompt is one user turn
    assert sum(g > b for g, b in zip(good, bad)) >= 22
    assert all(MARKER in c for c in chosen)


def _scored_rows():
    rows = preference_rows(5, seed=41)
    prompts = [r["prompt"] for r in rows]
    completions = [r["chosen"] if i % 2 else r["rejected"] for i, r in enumerate(rows)]
    return prompts, completions


def test_transformers_and_trl_score_it_as_our_scorer_does(trained, tiny_model_path, tmp_path):
    """The saved folder is a one-label sequence classifier: AutoModelForSequenceClassification
    and trl's RLOO `reward_funcs="<folder>"` give the rewards load_reward_model gives."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    prompts, completions = _scored_rows()
    ours = load_reward_model(trained.out)(prompts, [c[0]["content"] for c in completions])
    model = AutoModelForSequenceClassification.from_pretrained(trained.out).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained.out)
    texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        theirs = model(**batch).logits[:, 0].tolist()
    assert theirs == pytest.approx(ours, abs=1e-4)

    args = RLOOConfig(output_dir=str(tmp_path), num_generations=2, max_completion_length=4, report_to=[],
                      per_device_train_batch_size=2, use_cpu=True, bf16=False)
    trainer = RLOOTrainer(model=str(tiny_model_path), reward_funcs=str(trained.out), args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    rewards = trainer._calculate_rewards([{"prompt": p} for p in prompts], prompts, completions, None)
    assert rewards[:, 0].tolist() == pytest.approx(ours, abs=1e-4)


def test_a_lora_reward_model_saves_its_adapter_and_scores_alike(tiny_model_path, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(9, seed=4))
    config = RewardConfig(model=str(tiny_model_path), data=str(data), out=str(tmp_path / "out"), lr=1e-2,
                          max_steps=2, eval_fraction=0.0, save_every=0, lora_r=4, lora_target_modules="q_proj,v_proj")
    out = train_reward_model(config, progress=False).out
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    prompts, completions = _scored_rows()
    replies = [c[0]["content"] for c in completions]
    adapter = load_reward_model(out)(prompts, replies)
    from peft import AutoPeftModelForSequenceClassification

    merged = AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    load_model(str(tiny_model_path), dtype="float32").tokenizer.save_pretrained(tmp_path / "merged")
    assert load_reward_model(tmp_path / "merged")(prompts, replies) == pytest.approx(adapter, abs=1e-5)


def test_a_reward_model_trains_from_a_lora_policy_folder(tiny_model_path, tmp_path):
    """The pipeline's reward model starts from the SFT policy, which a LoRA run saves as an adapter."""
    from cai_fast.train.config import SFTConfig
    from cai_fast.train.sft import train_sft
    from helpers.rows import sft_rows

    sft = write_jsonl(tmp_path / "sft.jsonl", sft_rows(5, seed=2))
    policy = train_sft(SFTConfig(model=str(tiny_model_path), data=str(sft), out=str(tmp_path / "sft"), lr=1e-2,
                                 max_steps=1, save_every=0, lora_r=4), progress=False).out
    from cai_fast.engine.loading import load_tokenizer
    from cai_fast.train.reward import load_classifier

    backbone = load_classifier(str(policy), load_tokenizer(str(policy))).model.state_dict()
    merged = load_model(str(policy), dtype="float32").model.model.state_dict()  # the policy with its adapter merged
    assert backbone.keys() == merged.keys() and all(torch.allclose(backbone[k], merged[k]) for k in merged)
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(6, seed=4))
    result = train_reward_model(RewardConfig(model=str(policy), data=str(data), out=str(tmp_path / "reward"),
                                             max_steps=1, eval_fraction=0.0, save_every=0), progress=False)
    assert math.isfinite(result.history[0]["loss"])


def test_held_out_pairs_are_evaluated_during_training(tiny_model_path, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(13, seed=6, p_chosen=0.8))
    config = RewardConfig(model=str(tiny_model_path), data=str(data), out=str(tmp_path / "out"), lr=1e-2,
                          batch_size=4, max_steps=4, eval_fraction=0.3, eval_steps=2, save_every=0)
    result = train_reward_model(config, progress=False)
    evaluated = [h["step"] for h in result.history if "eval_accuracy" in h]
    assert evaluated == [2, 4] and result.history[-1]["eval_loss"] == pytest.approx(result.summary["eval_loss"])


def test_calibration_against_hand_computed_values():
    predicted = torch.tensor([0.12, 0.18, 0.81, 0.95, 0.55])
    p = torch.tensor([0.0, 0.5, 1.0, 1.0, 0.25])
    scores = calibration(predicted, p)
    brier = (0.12**2 + 0.32**2 + 0.19**2 + 0.05**2 + 0.30**2) / 5
    # bins: [0.1, 0.2) holds 0.12, 0.18 (mean 0.15 vs 0.25); [0.5, 0.6) 0.55 vs 0.25;
    # [0.8, 0.9) 0.81 vs 1; [0.9, 1] 0.95 vs 1
    ece = (2 * 0.10 + 0.30 + 0.19 + 0.05) / 5
    assert scores["brier"] == pytest.approx(brier, abs=1e-6)
    assert scores["ece"] == pytest.approx(ece, abs=1e-6)


def test_accuracy_leaves_out_undecided_pairs_and_follows_the_label_side():
    r_chosen = torch.tensor([1.0, 0.0, 2.0, -1.0])
    r_rejected = torch.tensor([0.0, 1.0, 1.0, 0.5])
    p = torch.tensor([0.9, 0.2, 0.5, 0.7])  # pair 2 (p = 0.2) prefers the "rejected" reply
    accuracy, decided = preference_accuracy(r_chosen, r_rejected, p)
    assert decided == 3 and accuracy == pytest.approx(2 / 3)


def test_held_out_split_is_seeded_and_disjoint():
    train, held = held_out_split(50, 0.2, seed=3)
    assert len(held) == 10 and sorted(train + held) == list(range(50))
    assert held_out_split(50, 0.2, seed=3) == (train, held) != held_out_split(50, 0.2, seed=4)
    assert held_out_split(5, 0.0, seed=0) == (list(range(5)), [])
    assert len(held_out_split(3, 0.01, seed=0)[1]) == 1


def test_not_a_reward_model_folder(tiny_model_path):
    from cai_fast.engine.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"not a reward model .*LlamaForCausalLM.*cai-fast train reward"):
        load_reward_model(tiny_model_path)
