"""The cai-fast command: help, one-line errors, and a real kill-and-resume of an SL-CAI run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from cai_fast.cli import main, make_parser

from helpers.processes import kill_when, line_count


FAST = ["--rounds", "2", "--batch-size", "2", "--answer-tokens", "8", "--critique-tokens", "6",
        "--revision-tokens", "8", "--quiet"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _cli(*args, cwd, timeout=300):
    """Run the installed command (from a scratch folder, so the source tree cannot shadow it)."""
    return subprocess.run([sys.executable, "-m", "cai_fast.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=timeout)


def test_help_covers_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["sl-cai", "--help"])
    out = capsys.readouterr().out
    for action in make_parser()._subparsers._group_actions[0].choices["sl-cai"]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
            assert action.option_strings[0] in out


@pytest.mark.parametrize("args, expected", [
    (["--constitution", "no-such-one"], "no-such-one"),
    (["--prompts", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--rounds", "7"], "rounds must be between 1 and 4"),
    (["--model", "/no/such/model"], "no such folder"),
])
def test_user_errors_are_one_line_without_traceback(args, expected, capsys, tmp_path):
    assert main(["sl-cai", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


INTERRUPTED_IN_EXEC = """
import argparse
import cai_fast.cli as cli

def command(args):  # as a SIGTERM during an import that makes a dataclass: the handler runs in exec()'d code
    exec("import os, signal\\nos.kill(os.getpid(), signal.SIGTERM)\\nfor _ in range(10 ** 7): pass")

cli.parse = lambda argv: argparse.Namespace(func=command, quiet=True)
cli.run_as_module()
"""


def test_a_sigterm_inside_exec_code_still_exits_130(tmp_path):
    """CPython marks a KeyboardInterrupt out of exec()'d code as unhandled even when main() catches it, and
    under `python -m` would end the process with SIGINT (-2): the kill-and-resume tests' intermittent exit."""
    (tmp_path / "interrupted_cli.py").write_text(INTERRUPTED_IN_EXEC)
    done = subprocess.run([sys.executable, "-m", "interrupted_cli"], capture_output=True, text=True, env=ENV,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "cai-fast: interrupted; run the same command again to resume"


def test_kill_and_resume_gives_the_uninterrupted_result(tiny_model_path, tmp_path):
    common = ["sl-cai", "--model", str(tiny_model_path), "--limit", "10", *FAST]
    full = _cli(*common, "--out", str(tmp_path / "full"), cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cai_fast.cli", *common, "--out", str(out)],
                            env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = out / "records-00000.jsonl"
    kill_when(proc, lambda: line_count(shard) >= 2, "2 records were written")
    written = line_count(shard)
    assert 2 <= written < 10, f"the kill came too late to test anything ({written} records)"

    resumed = _cli(*common, "--out", str(out), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({written} from an earlier run)" in resumed.stdout
    for name in ("records-00000.jsonl", "sft_messages/train-00000.jsonl", "preference/train-00000.jsonl"):
        a = [json.loads(x) for x in (tmp_path / "full" / name).read_text().splitlines()]
        b = [json.loads(x) for x in (out / name).read_text().splitlines()]
        key = lambda r: r["prompt_id"]
        assert sorted(a, key=key) == sorted(b, key=key), name


def test_resume_with_another_config_is_refused(tiny_model_path, tmp_path):
    common = ["sl-cai", "--model", str(tiny_model_path), "--limit", "2", "--out", str(tmp_path), *FAST]
    assert _cli(*common, cwd=tmp_path).returncode == 0
    again = _cli(*common[:-len(FAST)], *FAST[:1], "1", *FAST[2:], cwd=tmp_path)
    assert again.returncode == 2 and "rounds: 2 in the run, 1 now" in again.stderr


def _train_config(argv):
    from cai_fast.cli import parse, train_config

    return train_config(parse(argv))


OURS = ["train", "sft", "--model", "m", "--data", "d.jsonl", "--out", "o", "--lr", "3e-5", "--batch-size", "2",
        "--grad-accum", "4", "--epochs", "2", "--save-every", "10", "--mixed-precision", "bf16",
        "--gradient-checkpointing", "1", "--lora-r", "16", "--report-to", "tensorboard", "--lr-scheduler", "cosine"]


def test_trl_names_and_config_files_give_the_same_run_config(tmp_path):
    ours = _train_config(OURS)
    trl_style = _train_config([
        "train", "sft", "--model_name_or_path", "m", "--data", "d.jsonl", "--output_dir", "o", "--learning_rate",
        "3e-5", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4", "--num_train_epochs",
        "2", "--save_steps", "10", "--bf16", "--gradient_checkpointing", "--use_peft", "--report_to",
        "tensorboard", "--lr_scheduler_type", "cosine"])
    assert trl_style == ours and ours.gradient_checkpointing is True and ours.mixed_precision == "bf16"
    (tmp_path / "sft.yaml").write_text(
        "model_name_or_path: m\ndata: d.jsonl\noutput_dir: o\nlearning_rate: 3.0e-5\nper_device_train_batch_size: 2\n"
        "gradient_accumulation_steps: 4\nnum_train_epochs: 2\nsave_steps: 10\nbf16: true\n"
        "gradient_checkpointing: true\nuse_peft: true\nreport_to: tensorboard\nlr_scheduler_type: cosine\n")
    assert _train_config(["train", "sft", "--config", str(tmp_path / "sft.yaml")]) == ours
    (tmp_path / "sft.json").write_text(json.dumps({"model": "m", "data": "d.jsonl", "out": "o", "lr": 3e-5,
                                                   "batch-size": 2, "grad_accum": 4, "epochs": 2, "save_every": 10,
                                                   "mixed_precision": "bf16", "gradient_checkpointing": True,
                                                   "lora_r": 16, "report_to": "tensorboard",
                                                   "lr_scheduler": "cosine", "max_steps": 7}))
    from_json = _train_config(["train", "sft", "--config", str(tmp_path / "sft.json"), "--max_steps", "9"])
    assert from_json == dataclasses.replace(ours, max_steps=9)  # the command line overrides the file


def test_switches_are_real_booleans_and_keep_their_0_1_form():
    from cai_fast.cli import dataclass_from_args, parse
    from cai_fast.labelling.judge import JudgeConfig

    def defend(*flags):
        return dataclass_from_args(JudgeConfig, parse(["label", *flags])).defend

    assert defend() is True and defend("--defend", "0") is False and defend("--defend", "1") is True
    assert defend("--no_defend") is False and defend("--no-defend", "--defend") is True


def test_a_bad_config_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("learning_rat: 1e-5\n")
    with pytest.raises(SystemExit, match=r"bad.yaml: unknown option 'learning_rat' for `cai-fast train sft`"):
        main(["train", "sft", "--config", str(tmp_path / "bad.yaml")])


def test_a_finished_command_destroys_its_process_group(tmp_path, monkeypatch):
    """Under torchrun a command's process group is destroyed when it finishes: left to the
    interpreter's exit, gloo's threads can abort a finished run (pytorch/pytorch#190489)."""
    import torch.distributed as dist

    import cai_fast.cli as cli

    monkeypatch.setattr(cli, "cmd_pipeline", lambda args: None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["pipeline", "--config", "demo"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
