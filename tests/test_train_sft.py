"""SFT: the loss falls, LoRA saves an adapter (merged on request), accumulation is invariant, a
SIGKILLed or SIGTERMed run resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cai_fast.cli import main, make_parser
from cai_fast.engine import load_model
from cai_fast.train.config import SFTConfig
from cai_fast.train.sft import train_sft

from helpers.processes import STOPS, kill_when
from helpers.rows import sft_rows, write_jsonl


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl", sft_rows(13, seed=1))


def config(tiny_model_path, data, out, **kw) -> SFTConfig:
    base = dict(model=str(tiny_model_path), data=str(data), out=str(out), lr=3e-3, batch_size=4,
                max_steps=12, save_every=0)
    return SFTConfig(**{**base, **kw})


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_full_fine_tuning_reduces_the_loss_and_saves_a_loadable_model(tiny_model_path, sft_data, tmp_path):
    result = train_sft(config(tiny_model_path, sft_data, tmp_path / "full"), progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0], losses
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in logged] == list(range(1, 13))
    loaded = load_model(str(tmp_path / "full"), dtype="float32")
    assert max_difference(weights(tmp_path / "full"), weights(tiny_model_path)) > 1e-3
    assert loaded.tokenizer.chat_template
    again = train_sft(config(tiny_model_path, sft_data, tmp_path / "full"), progress=False)
    assert again.history == result.history  # a complete run is not trained twice


def test_lora_saves_its_adapter_and_merges_only_on_request(tiny_model_path, sft_data, tmp_path):
    lora = dict(lora_r=4, lr=1e-2, lora_dropout=0.1, max_steps=6)
    result = train_sft(config(tiny_model_path, sft_data, tmp_path / "lora", **lora), progress=False)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses
    adapter = tmp_path / "lora"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_dropout"] == 0.1

    merged = train_sft(config(tiny_model_path, sft_data, tmp_path / "merged", merge_lora=1, **lora), progress=False)
    assert merged.history == result.history
    saved = weights(tmp_path / "merged")
    assert not any("lora" in name for name in saved)
    changed = [k for k in saved if not torch.equal(saved[k], weights(tiny_model_path)[k])]
    assert changed and all("proj" in k for k in changed), changed  # only LoRA'd linear layers moved
    from_adapter, from_merged = (load_model(str(tmp_path / name), dtype="float32").model.state_dict() for name in ("lora", "merged"))
    assert max_difference(from_adapter, from_merged) < 1e-5  # load_model merges an adapter folder


def test_batch_one_times_accumulation_four_equals_batch_four(tiny_model_path, sft_data, tmp_path):
    """trl's invariant: the same global batch gives the same update however it is split."""
    one = train_sft(config(tiny_model_path, sft_data, tmp_path / "a", batch_size=1, grad_accum=4, max_steps=4),
                    progress=False)
    four = train_sft(config(tiny_model_path, sft_data, tmp_path / "b", batch_size=4, grad_accum=1, max_steps=4),
                     progress=False)
    assert [h["loss"] for h in one.history] == pytest.approx([h["loss"] for h in four.history], rel=1e-5)
    assert max_difference(weights(tmp_path / "a"), weights(tmp_path / "b")) < 1e-5


def _cli(*args):
    return [sys.executable, "-m", "cai_fast.cli", "train", "sft", *args, "--quiet"]


@pytest.mark.parametrize("stop", STOPS)
def test_a_killed_or_terminated_run_reruns_to_the_weights_of_an_uninterrupted_run(
        tiny_model_path, sft_data, tmp_path, capsys, stop):
    out = tmp_path / "killed"
    options = dict(lr=1e-2, batch_size=2, max_steps=40, save_every=3)
    args = ["--model", str(tiny_model_path), "--data", str(sft_data), "--out", str(out)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    child = subprocess.Popen(_cli(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(child, lambda: any((out / "checkpoints").glob("step-*")), "a checkpoint was written", timeout=120,
              stop=stop)
    assert not (out / "train_result.json").exists(), "the run finished before it could be killed"
    checkpoint = int(sorted((out / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    resumed = train_sft(config(tiny_model_path, sft_data, out, **options), progress=False)
    assert f"resuming sft from step {checkpoint}" in capsys.readouterr().out
    straight = train_sft(config(tiny_model_path, sft_data, tmp_path / "straight", **options), progress=False)
    assert resumed.history == straight.history  # metrics of every step exactly once, equal
    assert max_difference(weights(out), weights(tmp_path / "straight")) < 1e-6
    assert not list((out / "checkpoints").glob("step-*"))  # checkpoints dropped once complete


def test_rerun_with_another_config_is_refused(tiny_model_path, sft_data, tmp_path, capsys):
    args = ["train", "sft", "--model", str(tiny_model_path), "--data", str(sft_data), "--out", str(tmp_path),
            "--max-steps", "1", "--quiet"]
    assert main(args) == 0
    assert main(args[:-2] + ["2", "--quiet"]) == 2
    assert "max_steps: 1 in the run, 2 now" in capsys.readouterr().err


def test_bad_data_is_a_one_line_error(tiny_model_path, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": "hello"}])
    assert main(["train", "sft", "--model", str(tiny_model_path), "--data", str(path), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model-loading progress bar
    assert last.startswith("cai-fast: error: ") and f"{path} line 1: field 'messages'" in last
    assert main(["train", "sft", "--out", str(tmp_path / "o")]) == 2
    assert "pass --data" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_every_train_option_has_help(stage, capsys):
    with pytest.raises(SystemExit):
        main(["train", stage, "--help"])
    out = capsys.readouterr().out
    train = make_parser()._subparsers._group_actions[0].choices["train"]
    for action in train._subparsers._group_actions[0].choices[stage]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            assert action.option_strings[0] in out
