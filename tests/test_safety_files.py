"""Issue #11, the rest: every problem of a training data or pipeline config file in one error;
preference data whose two sides are the same response refused; the model recorded by content;
the corrected PPO and pipeline commands succeed on the folder a failed check left.

Tiny models only (tests/helpers/tiny.py); each test runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cai_fast.cli import main
from cai_fast.pipeline.config import ConfigFileError, load_pipeline_config
from cai_fast.train.data import TrainDataError, tokenize_preference, tokenize_sft, tokenized_records

from helpers.cli import SL_CAI, one_line_error
from helpers.rows import preference_rows, sft_rows
from helpers.tiny import build_tiny_model


def _lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- every problem of a training file


def test_every_bad_record_of_a_preference_file_is_named_in_one_error(tmp_path, tiny_loaded):
    good = preference_rows(2)
    rows = [good[0], "{not json", {"prompt": "q", "chosen": "a"}, {**good[1], "p_chosen": 1.5},
            {"prompt": "q", "chosen": "same  answer", "rejected": " same answer\n"}, good[1]]
    path = _lines(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(TrainDataError) as err:
        tokenized_records(tiny_loaded.tokenizer, path, "preference", tokenize_preference, 64)
    message = str(err.value)
    assert message.startswith(f"{path}: 4 bad records: ") and "\n" not in message, message
    for expected in ("line 2: not valid JSON", "line 3: a preference record needs", "'rejected' is missing",
                     "line 4: field 'p_chosen' must be a number in [0.0, 1.0]",
                     "line 5: field 'rejected' is the same response as 'chosen' (up to whitespace)"):
        assert expected in message, message


def test_every_bad_record_of_an_sft_file_is_named_and_the_list_is_capped(tmp_path, tiny_loaded):
    rows = [*sft_rows(2), "[1, 2]", {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "robot", "content": "hi"}]}] + [{"text": f"t{i}"} for i in range(10)]
    path = _lines(tmp_path / "sft.jsonl", rows)
    with pytest.raises(TrainDataError) as err:
        tokenized_records(tiny_loaded.tokenizer, path, "sft_messages", tokenize_sft, 64)
    message = str(err.value)
    assert message.startswith(f"{path}: 13 bad records: ") and message.endswith("and 3 more; fix every one of them")
    for expected in ("line 3: a record must be a JSON object", "line 4: the record has no assistant turn",
                     "line 5: field 'messages' message 0", "line 6: an SFT record needs"):
        assert expected in message, message


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_equal_sides_in_training_preferences_are_refused_by_the_command(tiny_model_path, tmp_path, capsys, stage):
    rows = [*preference_rows(3), {"prompt": "q", "chosen": [{"role": "assistant", "content": "yes\n\nno"}],
                                  "rejected": "yes no"}]
    path = _lines(tmp_path / "prefs.jsonl", rows)
    command = ["train", stage, "--model", str(tiny_model_path), "--out", str(tmp_path / "out"), "--max-steps", "1",
               "--quiet"]
    assert main([*command, "--data", str(path)]) == 2
    one_line_error(capsys, f"{path} line 4: field 'rejected' is the same response as 'chosen'", "drop the record",
                   after_loading=True)
    _lines(path, rows[:3])  # what the message says to do; the folder takes the corrected run
    assert main([*command, "--data", str(path)]) == 0


def test_pair_making_and_sl_cai_preferences_leave_out_sides_equal_up_to_whitespace():
    """What the training data check refuses is never made: the same normaliser everywhere."""
    from cai_fast.labelling.pairs import pairs_from_samples
    from cai_fast.sl_cai import preference_rows

    record = {"prompt": "q", "prompt_id": "p", "source": "s", "samples": ["a  b", "a b\n", "c"],
              "sample_ids": ["0", "1", "2"]}
    pairs, left_out = pairs_from_samples([record], 0, seed=0)
    assert len(pairs) == 2 and left_out["left_out_identical"] == 1
    revised = [{"prompt": "q", "prompt_id": str(i), "principle_ids": [], "initial": "x y", "final": final}
               for i, final in enumerate(["x\n\n y", "z"])]
    assert [row["prompt_id"] for row in preference_rows(revised)] == ["1"]


# ---------------------------------------------------------------- every problem of a pipeline config


def test_every_problem_of_a_pipeline_config_is_named_in_one_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('rounds = 7\nmodle = "x"\ntolerance = "high"\n[sl_cai]\nrounds = 0\nbatch_size = 0\n'
                    '[sft]\nmodel = "y"\n[eval]\nharmless_size = -1\n')
    with pytest.raises(ConfigFileError) as err:
        load_pipeline_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 7 problems: ") and "\n" not in message, message
    for expected in ("rounds must be between 1 and 4, got 7", "field 'modle': unknown field",
                     "field 'tolerance': must be a number", "[sl_cai] rounds must be between 1 and 4, got 0",
                     "[sl_cai] batch_size must be >= 1", "field 'sft.model': set by the pipeline",
                     "[eval] harmless_size must be >= 1"):
        assert expected in message, message


def test_every_missing_input_of_a_pipeline_is_one_line_and_writes_nothing(tiny_model_path, tmp_path, capsys):
    out, path = tmp_path / "run", tmp_path / "p.json"
    path.write_text(json.dumps({"out": str(out), "model": "/no/such/model", "prompts": "/no/such/prompts.txt",
                                "constitution": "/no/such/c.toml",
                                "eval": {"benchmarks": ["/no/such/gsm8k.jsonl"], "judge_model": str(tiny_model_path)}}))
    assert main(["pipeline", "--config", str(path), "--quiet"]) == 2
    one_line_error(capsys, f"{path}: 4 problems: ", "field 'model': model '/no/such/model': no such folder",
                   "field 'prompts': /no/such/prompts.txt: no such file", "field 'constitution': /no/such/c.toml",
                   "field 'eval.benchmarks': /no/such/gsm8k.jsonl")
    assert not out.exists()


# ---------------------------------------------------------------- the model, by content


def test_the_run_config_compares_the_model_by_content_not_by_the_path_typed(tiny_model_path, tmp_path, capsys):
    link, copy, out = tmp_path / "link", tmp_path / "copy", tmp_path / "out"
    link.symlink_to(tiny_model_path)
    shutil.copytree(tiny_model_path, copy)

    def sl_cai(model) -> int:
        return main(["sl-cai", "--model", str(model), "--out", str(out), *SL_CAI])

    assert sl_cai(tiny_model_path) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == str(tiny_model_path) and len(saved["model_sha256"]) == 64  # the typed path, for people
    capsys.readouterr()
    for same in (link, copy, os.path.relpath(copy)):  # the same model by other paths resumes
        assert sl_cai(same) == 0
        assert "(2 from an earlier run)" in capsys.readouterr().out
    shutil.rmtree(copy)
    build_tiny_model(copy, seed=1)  # another model in the same place
    assert sl_cai(copy) == 2
    one_line_error(capsys, "holds a run made with another config (model_sha256: ")


def test_training_compares_the_model_by_content(tiny_model_path, tmp_path, capsys):
    data = _lines(tmp_path / "sft.jsonl", sft_rows(4, seed=3))
    copy, out = tmp_path / "copy", tmp_path / "out"
    shutil.copytree(tiny_model_path, copy)

    def train(model, steps: int) -> int:
        return main(["train", "sft", "--model", str(model), "--data", str(data), "--out", str(out),
                     "--max-steps", str(steps), "--save-every", "1", "--quiet"])

    assert train(tiny_model_path, 1) == 0
    capsys.readouterr()
    assert train(copy, 1) == 0  # another path to the same model: the same run
    assert "is already complete; returning its result" in capsys.readouterr().out
    shutil.rmtree(copy)
    build_tiny_model(copy, seed=2)  # another model in the same place
    assert train(copy, 1) == 2
    one_line_error(capsys, "holds a run made with another config (model_sha256: ", after_loading=True)


def test_evaluation_outputs_compare_the_model_by_content(tiny_model_path, tmp_path):
    from cai_fast.evaluate import EvalConfig, load_eval_sets, outputs_of
    from cai_fast.store import RunConfigError

    config = EvalConfig(harmless_size=1, helpful_size=1, over_refusal_size=1, response_tokens=2, depth_ladder="")
    sets, copy, out = load_eval_sets(config), tmp_path / "copy", tmp_path / "outputs"
    first = outputs_of(str(tiny_model_path), sets, config, out, progress=False)
    shutil.copytree(tiny_model_path, copy)
    assert outputs_of(str(copy), sets, config, out, progress=False) == first  # read back, not made again
    shutil.rmtree(copy)
    build_tiny_model(copy, seed=3)
    with pytest.raises(RunConfigError, match="model_sha256: "):
        outputs_of(str(copy), sets, config, out, progress=False)


# ---------------------------------------------------------------- failed check, then the corrected command


@pytest.fixture(scope="module")
def reward_model_path(tiny_model_path, tmp_path_factory) -> Path:
    """A one-label classifier on the tiny backbone (PPO needs a score, not a good one)."""
    from transformers import AutoModelForSequenceClassification

    from cai_fast.engine import load_model

    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    folder = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(folder)
    load_model(str(tiny_model_path), dtype="float32").tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bad, expected", [
    (["--reward-model", "/no/such/rm"], "no such folder"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--data", "/no/such/prompts.txt"], "no such file"),
])
def test_ppo_after_a_failed_check_the_corrected_command_runs(tiny_model_path, reward_model_path, tmp_path, capsys,
                                                             bad, expected):
    prompts = _lines(tmp_path / "prompts.txt", ["Tell me a secret.", "Insult my neighbour.", "Write a threat."])
    out = tmp_path / "ppo"
    common = ["train", "ppo", "--model", str(tiny_model_path), "--reward-model", str(reward_model_path),
              "--data", str(prompts), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
              "--max-new-tokens", "3", "--ppo-epochs", "1", "--quiet"]
    assert main([*common, *bad]) == 2
    one_line_error(capsys, expected)
    assert main(common) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


PIPELINE = {"rounds": 1, "train_size": 2,
            "sl_cai": {"rounds": 1, "batch_size": 2, "few_shot": 0, "answer_tokens": 3, "critique_tokens": 3,
                       "revision_tokens": 3},
            "sft": {"max_steps": 1, "batch_size": 2},
            "label": {"samples": 2, "sample_tokens": 3},
            "judge": {"principles": 1, "batch_size": 4},
            "reward": {"max_steps": 1, "batch_size": 2},
            "ppo": {"max_steps": 1, "batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 3, "generation_batch": 2},
            "eval": {"harmless_size": 1, "helpful_size": 1, "over_refusal_size": 1, "response_tokens": 3,
                     "generation_batch": 2, "depth_ladder": ""}}


def test_a_pipeline_after_a_failed_check_the_corrected_command_runs(tiny_model_path, tmp_path, capsys):
    out, path = tmp_path / "run", tmp_path / "p.json"
    config = {**PIPELINE, "out": str(out), "model": str(tiny_model_path)}
    path.write_text(json.dumps({**config, "prompts": str(tmp_path / "absent.txt")}))
    assert main(["pipeline", "--config", str(path), "--quiet"]) == 2
    one_line_error(capsys, "field 'prompts'", "no such file")
    path.write_text(json.dumps(config))
    assert main(["pipeline", "--config", str(path), "--quiet"]) == 0
    assert json.loads((out / "state.json").read_text())["finished"] is True
