"""Device and precision of the training stages: `--device` / `--dtype` on every `train` command,
recorded in the run config and the summary; a device that does not exist is one line before
anything is written; every model is loaded where and in what the record says; bf16 steps stay
close to fp32 ones (losses and log-probs fp32); the pipeline's device and dtype reach training."""

from __future__ import annotations

import json

import pytest
import torch

from cai_fast.cli import main, parse, train_config
from cai_fast.engine.device import resolve_dtype
from cai_fast.engine.loading import load_tokenizer
from cai_fast.pipeline.rounds import Pipeline
from cai_fast.pipeline.config import ConfigFileError, config_from_dict
from cai_fast.train import common
from cai_fast.train.common import PolicyModule, load_policy, load_reference, model_precisions, placement
from cai_fast.train.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig
from cai_fast.train.data import TokenBatch, read_records, tokenize_preference
from cai_fast.train.dpo import sequence_logprobs, train_dpo
from cai_fast.train.ppo import PPOTrainer
from cai_fast.train.reward import train_reward_model
from cai_fast.train.sft import train_sft

from helpers.rows import preference_rows, sft_rows, write_jsonl
from helpers.tiny import build_tiny_model


NATIVE = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_path):
    """Training files for every stage, a second tiny model (reference ≠ policy) and a reward model
    whose head gives rewards far from 0 (so a loss is not log 2 whatever the precision)."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("device-data")
    torch.manual_seed(7)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    torch.nn.init.normal_(classifier.score.weight, std=1.0)
    classifier.save_pretrained(root / "reward-model")
    load_tokenizer(str(tiny_model_path)).save_pretrained(root / "reward-model")
    (root / "prompts.txt").write_text("Please rewrite the response\nwhich critique is better\nremove harmful content\n")
    return {"sft": write_jsonl(root / "sft.jsonl", sft_rows(5, seed=2)),
            "pairs": write_jsonl(root / "pairs.jsonl", preference_rows(6, seed=5, p_chosen=0.9)),
            "prompts": root / "prompts.txt", "reward_model": root / "reward-model",
            "reference": build_tiny_model(root / "reference", seed=1)}


def stage_args(stage: str, data: dict, tiny_model_path) -> list[str]:
    """The smallest `cai-fast train STAGE` run on the tiny models (one step)."""
    args = ["train", stage, "--model", str(tiny_model_path), "--max-steps", "1", "--batch-size", "2",
            "--save-every", "0", "--quiet"]
    extra = {"sft": ["--data", str(data["sft"])], "reward": ["--data", str(data["pairs"]), "--eval-fraction", "0"],
             "dpo": ["--data", str(data["pairs"])],
             "ppo": ["--data", str(data["prompts"]), "--reward-model", str(data["reward_model"]),
                     "--max-new-tokens", "3", "--ppo-epochs", "1"]}
    return args + extra[stage]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_every_train_command_takes_device_and_dtype_and_records_them(stage, dtype, data, tiny_model_path, tmp_path):
    out = tmp_path / "out"
    assert main([*stage_args(stage, data, tiny_model_path), "--out", str(out), "--device", "cpu",
                 "--dtype", dtype]) == 0
    saved = json.loads((out / "checkpoints" / "config.json").read_text())
    summary = json.loads((out / "train_result.json").read_text())["summary"]
    roles = {"sft": {"policy"}, "reward": {"reward_model"}, "dpo": {"policy", "reference"},
             "ppo": {"policy", "reference", "reward_model"}}[stage]
    expected = {role: {"device": "cpu", "dtype": dtype} for role in roles}  # an explicit dtype: every model
    assert (saved["device"], saved["dtype"]) == ("cpu", dtype)
    assert saved["models"] == expected and summary["models"] == expected and summary["autocast"] == "no"


def test_trl_use_cpu_is_device_cpu():
    args = parse(["train", "dpo", "--data", "d.jsonl", "--use_cpu"])
    assert train_config(args).device == "cpu"
    assert train_config(parse(["train", "dpo", "--data", "d.jsonl"])).device == "auto"


@pytest.mark.parametrize("option", [
    ["--device", "bogus"], ["--device", "cuda:99"], ["--dtype", "fp8"],
    pytest.param(["--device", "cuda"], marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine")),
])
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_a_device_that_does_not_exist_is_one_line_before_anything_is_written(stage, option, data, tiny_model_path,
                                                                             tmp_path, capsys, monkeypatch):
    def loaded(*_):
        raise AssertionError("the inputs were read before the device was checked")

    monkeypatch.setattr(common, "check_inputs", loaded)
    out = tmp_path / "out"
    assert main([*stage_args(stage, data, tiny_model_path), "--out", str(out), *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cai-fast: error: ") and f"{option[0]} '{option[1]}'" in err
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float32", "float16"])
def test_every_model_is_loaded_as_the_record_says_and_log_probs_are_fp32(dtype, data, tiny_model_path, tmp_path):
    """PPO loads all three kinds of model: the trained policy, a frozen reference, a frozen reward model."""
    config = PPOConfig(model=str(tiny_model_path), ref_model=str(data["reference"]), data=str(data["prompts"]),
                       reward_model=str(data["reward_model"]), out=str(tmp_path), batch_size=2, max_new_tokens=3,
                       save_every=0, max_steps=1, device="cpu", dtype=dtype)
    trainer = PPOTrainer(config, progress=False)
    loaded = {"policy": trainer.policy.lm, "reference": trainer.reference, "reward_model": trainer.scorer.model}
    recorded = model_precisions(config, "ppo")
    assert {role: str(next(m.parameters()).dtype).removeprefix("torch.") for role, m in loaded.items()} == \
        {role: r["dtype"] for role, r in recorded.items()}
    frozen = NATIVE if dtype == "auto" else dtype
    assert recorded["policy"]["dtype"] == ("float32" if dtype in ("auto", "float16") else dtype)
    assert recorded["reference"]["dtype"] == recorded["reward_model"]["dtype"] == frozen
    assert trainer.policy.value_head.weight.dtype == torch.float32  # a trained head keeps fp32 weights
    chats, _ = trainer.sample([ids for _, ids in trainer.prompts], step=0)
    old_logp, old_values, ref_logp = trainer.score(chats)
    assert {t.dtype for t in (*old_logp, *old_values, *ref_logp)} == {torch.float32}
    assert all(isinstance(s, float) for s in trainer.scorer(["a question"], ["an answer"]))


def test_a_lora_reference_is_the_policy_in_its_dtype(data, tiny_model_path, tmp_path):
    pytest.importorskip("peft")
    config = DPOConfig(model=str(tiny_model_path), data=str(data["pairs"]), out=str(tmp_path), lora_r=4,
                       device="cpu", dtype="bfloat16")
    lm, _ = load_policy(config)
    reference, ids = load_reference(config, PolicyModule(lm), "cpu"), torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the head as the losses read it, inside forward
        assert reference(ids, torch.ones_like(ids), lambda policy, hidden: policy.head()[0].dtype) == torch.bfloat16
    assert {p.dtype for p in lm.parameters() if p.requires_grad} == {torch.float32}  # peft's fp32 adapters
    assert model_precisions(config, "dpo")["reference"] == model_precisions(config, "dpo")["policy"]


def test_the_reference_of_dtype_auto_is_frozen_in_the_native_dtype_the_policy_fp32(data, tiny_model_path, tmp_path):
    config = DPOConfig(model=str(tiny_model_path), data=str(data["pairs"]), out=str(tmp_path), device="cpu")
    where = placement(config)
    assert (where.trained, str(where.frozen).removeprefix("torch.")) == (torch.float32, NATIVE)
    lm, tokenizer = load_policy(config)
    reference = load_reference(config, PolicyModule(lm), "cpu")
    assert not any(p.requires_grad for p in reference.parameters())
    pairs = [tokenize_preference(tokenizer, r, 128) for r in read_records(data["pairs"], "preference")]
    batch = TokenBatch.collate([p.chosen for p in pairs], tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        assert sequence_logprobs(reference, batch).dtype == torch.float32


def first_losses(train, config_cls, tmp_path, **kw) -> dict[str, float]:
    """The first step's loss at lr 0 in bf16 and in fp32 (same models, same data)."""
    return {dtype: train(config_cls(out=str(tmp_path / dtype), max_steps=1, batch_size=6, lr=0.0, save_every=0,
                                    device="cpu", dtype=dtype, **kw), progress=False).history[0]["loss"]
            for dtype in ("bfloat16", "float32")}


def test_a_bf16_dpo_step_is_close_to_the_fp32_one(data, tiny_model_path, tmp_path):
    losses = first_losses(train_dpo, DPOConfig, tmp_path, model=str(tiny_model_path), data=str(data["pairs"]),
                          ref_model=str(data["reference"]), beta=2.0)
    assert abs(losses["float32"] - 0.6931) > 0.05  # policy ≠ reference: a real comparison
    assert losses["bfloat16"] == pytest.approx(losses["float32"], abs=0.02) and losses["bfloat16"] != losses["float32"]


def test_a_bf16_reward_step_is_close_to_the_fp32_one(data, tmp_path):
    losses = first_losses(train_reward_model, RewardConfig, tmp_path, model=str(data["reward_model"]),
                          data=str(data["pairs"]), eval_fraction=0.0)
    assert abs(losses["float32"] - 0.6931) > 0.05  # rewards far from 0: a real comparison
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.03) and losses["bfloat16"] != losses["float32"]


def test_the_pipeline_gives_its_device_and_dtype_to_training(data, tiny_model_path, tmp_path):
    config = config_from_dict({"out": str(tmp_path / "run"), "model": str(tiny_model_path), "method": "dpo",
                               "device": "cpu", "dtype": "bfloat16",
                               "dpo": {"max_steps": 1, "batch_size": 2, "save_every": 0}}, "inline")
    summary = Pipeline(config, progress=False).train("dpo", 1, model=tiny_model_path, data=data["pairs"],
                                                     out=tmp_path / "dpo")
    saved = json.loads((tmp_path / "dpo" / "checkpoints" / "config.json").read_text())
    expected = {role: {"device": "cpu", "dtype": "bfloat16"} for role in ("policy", "reference")}
    assert (saved["device"], saved["dtype"]) == ("cpu", "bfloat16") and saved["models"] == summary["models"] == expected
    with pytest.raises(ConfigFileError, match=r"field 'dpo.dtype': set by the pipeline"):
        config_from_dict({"dpo": {"dtype": "float16"}}, "inline")


def test_float16_keeps_the_trained_model_in_fp32_so_adamw_stays_finite(data, tiny_model_path, tmp_path):
    """Pure fp16 AdamW is NaN from its first step (eps underflows); --dtype float16 loads the frozen
    models in fp16 and trains fp32 master weights."""
    result = train_sft(SFTConfig(model=str(tiny_model_path), data=str(data["sft"]), out=str(tmp_path), max_steps=2,
                                 batch_size=2, lr=1e-3, save_every=0, device="cpu", dtype="float16"), progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert result.summary["models"] == {"policy": {"device": "cpu", "dtype": "float32"}}


@pytest.mark.parametrize("option, where", [
    (["--device", "bogus"], "--device 'bogus' is not a device"), (["--dtype", "fp8"], "--dtype 'fp8' is not a dtype"),
    ([], "field 'device': --device 'cuda:x' is not a device"),  # the config file's own value, named as its field
    pytest.param(["--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine")),
])
def test_the_pipeline_command_refuses_a_device_in_one_line_before_anything_is_read(option, where, tiny_model_path,
                                                                                   tmp_path, capsys, monkeypatch):
    import cai_fast.pipeline.rounds as pipeline_config

    def read(*_):
        raise AssertionError("the inputs were read before the device was checked")

    monkeypatch.setattr(pipeline_config, "check_inputs", read)
    config = tmp_path / "pipeline.toml"
    out = tmp_path / "run"
    config.write_text(f'model = "{tiny_model_path}"\nout = "{out}"\ndevice = "{"cpu" if option else "cuda:x"}"\n')
    assert main(["pipeline", "--config", str(config), *option]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cai-fast: error: ") and where in err
    assert (str(config) in err) == (not option) and not out.exists()


def test_the_pipeline_command_s_device_and_dtype_override_the_config(tiny_model_path, tmp_path, monkeypatch):
    import cai_fast.pipeline.rounds as pipeline

    ran = []

    def run(config, **_):
        ran.append(config)
        return {"qualities": [], "stopped_early": False, "best_round": 0, "best_policy": "", "report": ""}

    monkeypatch.setattr(pipeline, "run_pipeline", run)
    config = tmp_path / "pipeline.toml"
    config.write_text(f'model = "{tiny_model_path}"\nout = "{tmp_path / "run"}"\ndevice = "auto"\ndtype = "float16"\n')
    assert main(["pipeline", "--config", str(config), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert main(["pipeline", "--config", str(config)]) == 0
    assert [(c.device, c.dtype) for c in ran] == [("cpu", "bfloat16"), ("auto", "float16")]
