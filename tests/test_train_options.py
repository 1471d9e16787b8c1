"""Training options a trl user expects: mixed precision (accelerate's), gradient checkpointing,
LoRA's reference pass by disabling the adapter, peft as an optional extra, LR schedules, trackers
and readable learning rates."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from accelerate.tracking import GeneralTracker

from cai_fast.engine.loading import ModelLoadError, require_peft
from cai_fast.train import common
from cai_fast.train.common import AdapterDisabled, PolicyModule, load_policy, load_reference, readable
from cai_fast.train.config import DPOConfig
from cai_fast.train.data import TokenBatch, read_records, tokenize_preference
from cai_fast.train.distributed import make_accelerator
from cai_fast.train.dpo import sequence_logprobs, train_dpo

from helpers.rows import preference_rows, write_jsonl


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", preference_rows(11, seed=3, p_chosen=0.8))


def dpo(tiny_model_path, data, out, **kw) -> DPOConfig:
    base = dict(model=str(tiny_model_path), data=str(data), out=str(out), lr=1e-2, batch_size=4, max_steps=3,
                save_every=0, mixed_precision="no", dtype="float32")
    return DPOConfig(**{**base, **kw})


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


def test_lora_reference_is_the_policy_with_its_adapter_disabled(tiny_model_path, pairs_file, tmp_path):
    """The reference pass of a LoRA policy equals a separately loaded frozen base model's."""
    config = dpo(tiny_model_path, pairs_file, tmp_path, lora_r=4)
    lm, tokenizer = load_policy(config)
    for name, p in lm.named_parameters():
        if "lora_B" in name:  # adapters start as a no-op; make them matter
            torch.nn.init.normal_(p, std=0.3)
    policy = PolicyModule(lm)
    reference = load_reference(config, policy, "cpu")
    assert isinstance(reference, AdapterDisabled) and not list(reference.parameters())
    separate = load_reference(dpo(tiny_model_path, pairs_file, tmp_path, ref_model=str(tiny_model_path)), policy, "cpu")
    pairs = [tokenize_preference(tokenizer, r, 256) for r in read_records(pairs_file, "preference")[:5]]
    batch = TokenBatch.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        disabled, frozen, adapted = (sequence_logprobs(m, batch) for m in (reference, separate, policy))
    assert torch.allclose(disabled, frozen, atol=1e-5) and not torch.allclose(adapted, frozen, atol=1e-3)


def test_lora_dpo_trains_and_saves_an_adapter(tiny_model_path, pairs_file, tmp_path):
    result = train_dpo(dpo(tiny_model_path, pairs_file, tmp_path, lora_r=4, lora_target_modules="q_proj, v_proj"),
                       progress=False)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # π = π_ref at the start
    assert losses(result)[-1] < losses(result)[0]
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_model_path, pairs_file, tmp_path):
    plain = train_dpo(dpo(tiny_model_path, pairs_file, tmp_path / "plain"), progress=False)
    checkpointed = train_dpo(dpo(tiny_model_path, pairs_file, tmp_path / "gc", gradient_checkpointing=1),
                             progress=False)
    assert losses(checkpointed) == pytest.approx(losses(plain), abs=1e-5)


def test_bf16_autocast_trains_close_to_fp32(tiny_model_path, pairs_file, tmp_path):
    fp32 = train_dpo(dpo(tiny_model_path, pairs_file, tmp_path / "fp32"), progress=False)
    bf16 = train_dpo(dpo(tiny_model_path, pairs_file, tmp_path / "bf16", mixed_precision="bf16"), progress=False)
    assert all(math.isfinite(x) for x in losses(bf16))
    assert losses(bf16) == pytest.approx(losses(fp32), abs=0.01) and losses(bf16) != losses(fp32)  # autocast ran
    assert make_accelerator().mixed_precision == "no"  # the next run is fp32 again


def test_accelerate_launch_precision_is_respected(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert make_accelerator("auto").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"  # an explicit choice wins
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert make_accelerator("auto").mixed_precision == "no"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 mixed precision needs a CUDA GPU.*bf16"):
            make_accelerator("fp16")


def test_missing_peft_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ModelLoadError, match=r"LoRA needs peft.*pip install"):
        require_peft()


class MemoryTracker(GeneralTracker):
    """An in-memory accelerate tracker (tensorboard, wandb and trackio are not installed here)."""

    name, requires_logging_directory = "memory", False
    runs: list = []

    def __init__(self, run_name: str):
        super().__init__()
        self.config, self.logged, self.finished = None, [], False
        MemoryTracker.runs.append(self)

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict):
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_metrics_reach_the_trackers_and_the_schedule_is_the_chosen_one(tiny_model_path, pairs_file, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(common, "trackers", lambda report_to: [MemoryTracker("dpo")] if report_to == "memory" else None)
    config = dpo(tiny_model_path, pairs_file, tmp_path, max_steps=4, warmup_steps=1, lr=2e-5,
                 lr_scheduler="cosine", report_to="memory")
    result = train_dpo(config, progress=False)
    tracker = MemoryTracker.runs[-1]
    assert tracker.finished and tracker.config["lr_scheduler"] == "cosine"
    assert [step for step, _ in tracker.logged] == [1, 2, 3, 4]
    assert tracker.logged[0][1]["loss"] == result.history[0]["loss"]
    # transformers' cosine with one warm-up step: 0, then lr·½(1 + cos(π·k/3)) for k = 0, 1, 2
    expected = [0.0] + [2e-5 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected, abs=1e-12)


def test_learning_rates_print_readably():
    assert readable({"lr": 2e-5, "loss": 0.123456789, "step": 3}) == {"lr": 2e-5, "loss": 0.1235, "step": 3}
    assert str(readable({"lr": 2e-5})["lr"]) == "2e-05"
