"""Two CPU processes (torchrun, gloo) give what one process gives: SFT weights and generations, and every
training stage sharded with FSDP2 (first losses, saved models, a killed run resumed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cai_fast.engine import SamplingParams, load_model, make_generator
from cai_fast.data.prompts import render, user
from cai_fast.train import STAGES
from cai_fast.train.config import SFTConfig
from cai_fast.train.distributed import FSDPSettings, fsdp_mode, fsdp_settings, gather_shards, shard_for_process
from cai_fast.train.sft import train_sft

from helpers.processes import kill_tree
from helpers.rows import preference_rows, sft_rows, write_jsonl


WORKER = Path(__file__).with_name("accelerate_worker.py")
PROMPTS = ["Please rewrite the response", "the answer", "Which response is better", "identify ways",
           "remove harmful content"]


FSDP2_ON_CPU = """distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


def two_processes(spec: dict, folder: Path, accelerate_config: str = "") -> list[str]:
    """The command that runs tests/accelerate_worker.py on `spec` (written to folder/spec.json) on two processes:
    torchrun, or `accelerate launch --config_file` with this config (YAML)."""
    (folder / "spec.json").write_text(json.dumps(spec))
    if not accelerate_config:
        launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        (folder / "accelerate.yaml").write_text(accelerate_config)
        with socket.socket() as probe:  # a free port: accelerate's default (29500) may be taken by another run
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launcher = ["accelerate.commands.launch", "--config_file", str(folder / "accelerate.yaml"),
                    "--main_process_port", str(port)]
    return [sys.executable, "-m", *launcher, str(WORKER), str(folder / "spec.json")]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(spec: dict, folder: Path, accelerate_config: str = "") -> str:
    """Run `spec` on two processes (see two_processes) to the end; their output."""
    done = subprocess.run(two_processes(spec, folder, accelerate_config), capture_output=True, text=True,
                          timeout=300, env=ENV)
    failed = [line for line in done.stderr.splitlines() if line.startswith("[rank")]  # the workers' tracebacks
    assert done.returncode == 0, "\n".join(failed[-40:]) or done.stderr[-3000:]
    return done.stdout


def test_shards_interleave_and_cover_every_item_once():
    items = list(range(11))
    shards = [shard_for_process(items, SimpleNamespace(process_index=p, num_processes=3)) for p in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    one = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    assert shard_for_process(items, one) == items and gather_shards(items, one) == items


def test_two_processes_equal_one(tiny_model_path, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(11, seed=7))
    sft = dict(model=str(tiny_model_path), data=str(data), lr=3e-3, max_steps=3, save_every=0, seed=1)
    spec = {"train": [["sft", {**sft, "out": str(tmp_path / "two"), "batch_size": 2}]],
            "generate": {"model": str(tiny_model_path), "prompts": PROMPTS, "max_new_tokens": 6,
                         "out": str(tmp_path / "generated.jsonl")}}
    launch(spec, tmp_path)

    # global batch 4 as 2 processes × 2 equals 1 process × 4: same losses, same final weights
    one = train_sft(SFTConfig(**sft, out=str(tmp_path / "one"), batch_size=4), progress=False)
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [h["tokens"] for h in two] == [h["tokens"] for h in one.history]
    for theirs, ours in zip(two, one.history):
        assert abs(theirs["loss"] - ours["loss"]) < 1e-5
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    base = load_file(str(tiny_model_path / "model.safetensors"))
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3  # training moved the weights
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    # prompt-sharded generation, merged into one file in prompt order, equals one process's
    merged = [json.loads(line) for line in (tmp_path / "generated.jsonl").read_text().splitlines()]
    assert [r["index"] for r in merged] == list(range(len(PROMPTS)))
    assert [r["process"] for r in merged] == [0, 1, 0, 1, 0]  # two processes did run
    loaded = load_model(str(tiny_model_path), dtype="float32")
    single = make_generator(loaded, batch_size=1).generate(
        [render(loaded.tokenizer, [user(p)]) for p in PROMPTS], SamplingParams(max_new_tokens=6))
    assert [r["text"] for r in merged] == [c.text for c in single]


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(folder / name))


def assert_same_run(sharded: list[dict], single: list[dict], keys=("loss", "grad_norm"), rel: float = 1e-4) -> None:
    assert [h["step"] for h in sharded] == [h["step"] for h in single]
    for theirs, ours in zip(sharded, single):
        for key in keys:
            assert theirs[key] == pytest.approx(ours[key], rel=rel, abs=1e-5), (key, theirs, ours)


def assert_same_model(sharded: Path, single: Path) -> None:
    """Same weights, to float rounding: a sharded step sums the gradients (and their norm) in another order, which
    AdamW's normalisation magnifies for the few weights whose gradient is near zero (seen: 8 of 50k weights off by
    up to 2e-4 after three steps at lr 3e-3), so the bound is on the mean and the worst apart."""
    a, b = saved_weights(sharded), saved_weights(single)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diff.mean()) < 1e-6 and float(diff.max()) < 1e-3, (sharded.name, float(diff.mean()), float(diff.max()))


def history(folder: Path, sharded: str | None = None) -> list[dict]:
    """The run's metrics; with `sharded`, after checking the run was sharded so ("" = not sharded)."""
    result = json.loads((folder / "train_result.json").read_text())
    assert sharded is None or result["summary"]["fsdp"] == sharded
    return result["history"]


def test_fsdp_sharded_stages_equal_one_process(tiny_model_path, tmp_path):
    """SFT (also with gradient checkpointing, and bf16), the reward model and DPO (a frozen reference copy, and
    LoRA's adapter-disabled one) sharded with FSDP2 over two processes (batch 2 each) take the steps one process
    takes on the same global batch of 4, and save the same model, whole; PPO sharded equals PPO data-parallel
    over the same two processes (its rollouts are seeded per process, so one process samples others), its engine
    fed the gathered weights, its reward model sharded. bf16 is autocast in one process and bf16 weights gathered
    under FSDP, so it is held to 2e-3 only (seen: 3e-4)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(11, seed=7))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(10, seed=3, p_chosen=0.8))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Please rewrite the response\nthe answer\nWhich response is better\nidentify ways\n")
    common = dict(model=str(tiny_model_path), max_steps=3, save_every=0, seed=1, dtype="float32")
    sft, dpo = dict(common, data=str(sft_data), lr=3e-3), dict(common, data=str(pairs), lr=1e-2, beta=0.5)
    runs = {"sft": ("sft", sft, "full_shard"),
            "sft-checkpointing": ("sft", dict(sft, gradient_checkpointing=True), "shard_grad_op"),
            "sft-bf16": ("sft", dict(sft, mixed_precision="bf16"), "full_shard"),
            "reward": ("reward", dict(common, data=str(pairs), lr=3e-3, eval_fraction=0.3), "full_shard"),  # 3 held out
            "dpo": ("dpo", dpo, "full_shard"),
            "dpo-lora": ("dpo", dict(dpo, lora_r=4), "shard_grad_op")}
    train = [[stage, {**fields, "out": str(tmp_path / "two" / name), "batch_size": 2, "fsdp": mode}]
             for name, (stage, fields, mode) in runs.items()]
    ppo = dict(common, data=str(prompts), reward_model=str(tmp_path / "two" / "reward"), lr=3e-3, batch_size=1,
               max_new_tokens=5, temperature=1.0, max_steps=2)
    train += [["ppo", {**ppo, "out": str(tmp_path / "two" / f"ppo{r}-{mode or 'ddp'}"), "fsdp": mode, "lora_r": r}]
              for r in (0, 4) for mode in ("", "full_shard")]
    launch({"train": train}, tmp_path)

    for name, (stage, fields, mode) in runs.items():
        STAGES[stage].run(STAGES[stage].config(**fields, out=str(tmp_path / "one" / name), batch_size=4),
                          progress=False)
        sharded, single = tmp_path / "two" / name, tmp_path / "one" / name
        if name == "sft-bf16":
            assert_same_run(history(sharded, mode), history(single, ""), keys=("loss",), rel=2e-3)
            continue
        assert_same_run(history(sharded, mode), history(single, ""))
        assert_same_model(sharded, single)
    summary = json.loads((tmp_path / "two" / "reward" / "train_result.json").read_text())["summary"]
    ours = json.loads((tmp_path / "one" / "reward" / "train_result.json").read_text())["summary"]
    assert summary["eval_pairs"] == 3 and summary["eval_loss"] == pytest.approx(ours["eval_loss"], rel=1e-4)
    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "sft")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / "reward", num_labels=1)

    for r in (0, 4):  # full fine-tuning, and LoRA (the engine runs the copy's base with its adapters)
        ddp, fsdp = tmp_path / "two" / f"ppo{r}-ddp", tmp_path / "two" / f"ppo{r}-full_shard"
        assert_same_run(history(fsdp, "full_shard"), history(ddp, ""),
                        keys=("reward", "kl", "pg_loss", "value_loss", "grad_norm"))
        assert_same_model(fsdp, ddp)
        rewards = [json.loads((run / "train_result.json").read_text())["summary"]["reward"] for run in (fsdp, ddp)]
        assert [r["sharded"] for r in rewards] == [True, False]  # the reward model is sharded with the policy
    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "ppo0-full_shard")


def test_a_killed_fsdp_run_resumes_to_the_one_process_result(tiny_model_path, tmp_path):
    """Sharded by `accelerate launch --config_file` with an FSDP2 config on CPUs, killed after a checkpoint,
    rerun: every step once, as one process took it."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(11, seed=7))
    fields = dict(model=str(tiny_model_path), data=str(data), lr=3e-3, max_steps=12, save_every=2, seed=1,
                  dtype="float32")
    out = tmp_path / "two"
    spec = {"train": [["sft", {**fields, "out": str(out), "batch_size": 2}]]}
    child = subprocess.Popen(two_processes(spec, tmp_path, FSDP2_ON_CPU), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any((out / "checkpoints").glob("step-*")):
        assert child.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
    kill_tree(child.pid)  # accelerate, its torchrun and both processes
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "train_result.json").exists(), "the run finished before it could be killed"
    step = int(sorted((out / "checkpoints").glob("step-*"))[-1].name.split("-")[1])

    assert f"resuming sft from step {step}" in launch(spec, tmp_path, FSDP2_ON_CPU)
    train_sft(SFTConfig(**fields, out=str(tmp_path / "one"), batch_size=4), progress=False)
    assert_same_run(history(out, "full_shard"), history(tmp_path / "one"))  # every step once, as one process took it
    assert_same_model(out, tmp_path / "one")
    assert not list((out / "checkpoints").glob("step-*"))


def test_fsdp_mode_from_the_option_or_accelerate_config(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_mode("") == "" and fsdp_mode("shard_grad_op") == "shard_grad_op"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_mode("") == "full_shard"
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert fsdp_mode("") == "shard_grad_op"
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")  # the older key, which accelerate still passes
    assert fsdp_mode("") == "shard_grad_op"
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="set fsdp_version: 2"):
        fsdp_mode("")


def test_merge_lora_under_fsdp_is_a_one_line_error(monkeypatch):
    from cai_fast.train import common

    monkeypatch.setattr(common, "process_state", lambda: SimpleNamespace(num_processes=2))
    config = SFTConfig(data="chats.jsonl", lora_r=4, merge_lora=True, fsdp="full_shard")
    with pytest.raises(ValueError, match="--merge-lora under FSDP: save the adapter"):
        common.sharding(config)
    assert common.sharding(SFTConfig(data="chats.jsonl", lora_r=4, fsdp="full_shard")) == "full_shard"
    monkeypatch.setattr(common, "process_state", lambda: SimpleNamespace(num_processes=1))
    assert common.sharding(config) == ""  # one process: nothing to shard


LAUNCH_DEFAULTS = {  # what `accelerate launch` puts in the environment for an FSDP config that sets nothing else
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_MIN_NUM_PARAMS": "100000000",
    "FSDP_FORWARD_PREFETCH": "false", "FSDP_USE_ORIG_PARAMS": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
    "FSDP_SYNC_MODULE_STATES": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false"}


def test_each_accelerate_fsdp_setting_is_honoured_or_refused_by_name(monkeypatch, tiny_model_path):
    from transformers import AutoModelForCausalLM

    from cai_fast.train import common
    from cai_fast.train.distributed import _units

    for name in ("FSDP_AUTO_WRAP_POLICY", "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_BACKWARD_PREFETCH",
                 "FSDP_STATE_DICT_TYPE", "FSDP_IGNORED_MODULES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in LAUNCH_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="^accelerate config fsdp_cpu_ram_efficient_loading: true .*set it false$"):
        fsdp_settings("full_shard")  # accelerate's default: every process loads the whole model here
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    assert fsdp_settings("full_shard") == FSDPSettings("full_shard", sync_module_states=True)
    refused = [("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "fsdp_auto_wrap_policy"),
               ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", "fsdp_state_dict_type"),
               ("FSDP_BACKWARD_PREFETCH", "BACKWARD_POST", "fsdp_backward_prefetch"),
               ("FSDP_USE_ORIG_PARAMS", "false", "fsdp_use_orig_params"),
               ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "true", "fsdp_activation_checkpointing_offload"),
               ("FSDP_IGNORED_MODULES", "lm_head", "fsdp_ignored_modules"),
               ("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD", "fsdp_sharding_strategy")]
    for name, value, key in refused:
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ValueError, match=f"^accelerate config {key}: {value} is not supported"):
                fsdp_settings("full_shard")
    honoured = {"FSDP_OFFLOAD_PARAMS": "true", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaMLP, LlamaAttention", "FSDP_FORWARD_PREFETCH": "true",
                "FSDP_BACKWARD_PREFETCH": "NO_PREFETCH", "FSDP_SYNC_MODULE_STATES": "false",
                "FSDP_ACTIVATION_CHECKPOINTING": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}
    for name, value in honoured.items():
        monkeypatch.setenv(name, value)
    settings = fsdp_settings("shard_grad_op")
    assert settings == FSDPSettings("shard_grad_op", offload=True, units=("LlamaMLP", "LlamaAttention"),
                                    forward_prefetch=True, backward_prefetch=False, activation_checkpointing=True)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    layers = len(model.model.layers)
    assert [type(m).__name__ for m in _units(model, settings)] == ["LlamaMLP", "LlamaAttention"] * layers
    assert [type(m).__name__ for m in _units(model, FSDPSettings())] == ["LlamaDecoderLayer"] * layers
    assert _units(model, FSDPSettings(no_wrap=True)) == []
    with pytest.raises(ValueError, match="names Nope, which LlamaForCausalLM does not hold; its blocks are Llama"):
        _units(model, FSDPSettings(units=("Nope",)))
    with pytest.raises(ValueError, match="cls_to_wrap: Embedding lie outside the transformer blocks"):
        _units(model, FSDPSettings(units=("Embedding",)))
    monkeypatch.setattr(common, "process_state", lambda: SimpleNamespace(num_processes=2))
    trained = common.prepare_for_training(model, SFTConfig(data="chats.jsonl"))
    assert trained.is_activation_checkpointing  # fsdp_activation_checkpointing, as --gradient-checkpointing


FSDP2_EVERY_SETTING = """distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: false
  fsdp_offload_params: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer,LlamaMLP
  fsdp_forward_prefetch: true
  fsdp_backward_prefetch: NO_PREFETCH
  fsdp_activation_checkpointing: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_sync_module_states: true
  fsdp_cpu_ram_efficient_loading: false
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


def test_an_fsdp_config_with_every_honoured_setting_trains_as_one_process(tiny_model_path, tmp_path):
    """CPU offload, nested units of the named classes, forward prefetch, no backward prefetch, activation
    checkpointing and synced module states, from an accelerate config: the steps one process takes."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(11, seed=7))
    fields = dict(model=str(tiny_model_path), data=str(data), lr=3e-3, max_steps=3, save_every=0, seed=1,
                  dtype="float32")
    launch({"train": [["sft", {**fields, "out": str(tmp_path / "two"), "batch_size": 2}]]}, tmp_path,
           FSDP2_EVERY_SETTING)
    train_sft(SFTConfig(**fields, out=str(tmp_path / "one"), batch_size=4), progress=False)
    assert_same_run(history(tmp_path / "two", "shard_grad_op"), history(tmp_path / "one"))
    assert_same_model(tmp_path / "two", tmp_path / "one")
    summary = json.loads((tmp_path / "two" / "train_result.json").read_text())["summary"]
    assert summary["fsdp_settings"] == {"mode": "shard_grad_op", "offload": True,
                                        "units": ["LlamaDecoderLayer", "LlamaMLP"], "no_wrap": False,
                                        "forward_prefetch": True, "backward_prefetch": False,
                                        "sync_module_states": True, "activation_checkpointing": True}
