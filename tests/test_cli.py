"""The cai-fast command: help, one-line errors, and a real kill-and-resume of an SL-CAI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import kill_when, line_count

from cai_fast.cli import main, make_parser

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
