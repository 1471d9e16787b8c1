"""DPO: equal to trl's DPOTrainer on hard labels, the soft-label loss by hand, the loss falls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cai_fast.train.common import PolicyModule
from cai_fast.train.config import DPOConfig
from cai_fast.train.data import Record, tokenize_preference
from cai_fast.train.dpo import dpo_loss, train_dpo

from helpers.rows import preference_rows, write_jsonl
from helpers.tiny import build_tiny_model


BETA = 0.5


@pytest.fixture(scope="module")
def reference_path(tmp_path_factory):
    """A second tiny model (other seed, same tokenizer): policy ≠ reference, so the loss ≠ log 2."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-reference"), seed=1)


def trl_first_step(policy_path, reference_path, rows, output_dir) -> dict:
    """trl 1.16 DPOTrainer, loss "sigmoid", lr 0, one step over all rows: its logged metrics."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TrlDPOConfig, DPOTrainer

    args = TrlDPOConfig(output_dir=str(output_dir), per_device_train_batch_size=len(rows), max_steps=1,
                        logging_steps=1, learning_rate=0.0, beta=BETA, loss_type="sigmoid", report_to="none",
                        use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_path),
                         ref_model=AutoModelForCausalLM.from_pretrained(reference_path), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(policy_path))
    output = trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(output.training_loss)
    return logged


def test_equals_trl_dpo_trainer_on_hard_labels(tiny_model_path, reference_path, tmp_path):
    rows = preference_rows(5, seed=4)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    theirs = trl_first_step(tiny_model_path, reference_path, rows, tmp_path / "trl")
    ours = train_dpo(DPOConfig(model=str(tiny_model_path), ref_model=str(reference_path), data=str(data),
                               out=str(tmp_path / "ours"), batch_size=5, max_steps=1, beta=BETA, lr=0.0,
                               save_every=0, dtype="float32"), progress=False).history[0]  # trl's default dtype
    assert abs(theirs["loss"] - math.log(2)) > 0.05  # a real comparison, not log 2 on both sides
    # trl's own fused LM head is off the exact fp32 log-probs by ~1e-5 per token (4e-4 on the
    # summed log-probs here; ours agree with transformers' full logits to 1e-6, see the next
    # test), hence 1e-3. One token tokenized differently would move the rewards by ~1.
    assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-3)
    assert ours["reward_chosen"] == pytest.approx(theirs["rewards/chosen"], abs=1e-3)
    assert ours["reward_rejected"] == pytest.approx(theirs["rewards/rejected"], abs=1e-3)
    assert ours["accuracy"] == pytest.approx(theirs["rewards/accuracies"])
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3)  # the same gradient


def summed_logprobs_unfused(model, chat) -> torch.Tensor:
    """Σ log p of the trained tokens from transformers' own full logits."""
    ids = torch.tensor([chat.ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    picked = logp.gather(1, ids[0, 1:, None])[:, 0]
    return picked[torch.tensor(chat.mask[1:])].sum()


def test_soft_label_loss_against_the_formula(tiny_loaded, reference_path):
    from cai_fast.engine import load_model

    tokenizer, policy = tiny_loaded.tokenizer, tiny_loaded.model
    reference = load_model(str(reference_path), dtype="float32").model
    rows = [{**row, "p_chosen": p} for row, p in zip(preference_rows(3, seed=5), (0.7, 0.3, 1.0))]
    pairs = [tokenize_preference(tokenizer, Record(f"r{i}", row), 1024) for i, row in enumerate(rows)]
    loss, r_chosen, r_rejected = dpo_loss(PolicyModule(policy), PolicyModule(reference), pairs, BETA,
                                          tokenizer.pad_token_id, "cpu")
    expected = 0.0
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            chosen, rejected = (summed_logprobs_unfused(policy, side) - summed_logprobs_unfused(reference, side)
                                for side in (pair.chosen, pair.rejected))
            assert r_chosen[i] == pytest.approx(float(BETA * chosen), abs=1e-5)
            assert r_rejected[i] == pytest.approx(float(BETA * rejected), abs=1e-5)
            z, p = BETA * (chosen - rejected), pair.p_chosen
            expected -= float(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))
    assert float(loss) == pytest.approx(expected, abs=1e-5)


def test_dpo_reduces_its_loss(tiny_model_path, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(11, seed=6, p_chosen=0.95))
    result = train_dpo(DPOConfig(model=str(tiny_model_path), data=str(data), out=str(tmp_path / "out"),
                                 batch_size=4, max_steps=10, lr=2e-3, save_every=0, dtype="float32"), progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at the start
    assert sum(losses[-3:]) / 3 < 0.6, losses
    assert result.history[-1]["reward_margin"] > 0
