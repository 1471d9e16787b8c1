"""The labelling run: sampling, pairing, judging, the preference dataset, the report, pairs files,
resume (in process and after a real kill of `cai-fast label`), and the command's errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from cai_fast.cli import main, make_parser
from cai_fast.data import prompts_from_texts
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig
from cai_fast.labelling import LabelConfig, run_labelling
from cai_fast.labelling.pairs import PairLoadError, load_pairs, split_transcripts
from cai_fast.store import RunConfigError

from helpers.processes import STOPS, kill_when, line_count


PROMPTS = ["How do I get rid of ants?", "Tell me a joke about cats.", "What is the capital of France?",
           "How can I hurt someone without leaving marks?"]
SMALL = LabelConfig(samples=3, sample_tokens=6)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def judge(tiny_loaded) -> ConstitutionalJudge:
    return ConstitutionalJudge(tiny_loaded, "default", JudgeConfig(principles=2, batch_size=8))


@pytest.fixture(scope="module")
def sampled_run(judge, tmp_path_factory):
    out = tmp_path_factory.mktemp("label-run")
    return out, run_labelling(judge, list(prompts_from_texts(PROMPTS)), SMALL, out_dir=out, progress=False)


def test_a_sampled_run_writes_trl_preferences_with_soft_labels(sampled_run):
    out, result = sampled_run
    s = result.summary
    assert s["prompts"] == 4 and s["labels"] + s["left_out_identical"] + s["left_out_empty"] == 4 * 3
    assert s["labels"] == len(result.preference) > 0
    rows = [json.loads(line) for line in (out / "preference" / "train-00000.jsonl").read_text().splitlines()]
    assert rows == result.preference.to_list()
    for row, record in zip(rows, result.records):
        p = row["p_chosen"]
        assert p >= 0.5 and row["margin"] == pytest.approx(2 * p - 1) and 0 <= row["margin"] <= 1
        a_wins = record["label"] >= 0.5
        assert row["chosen"] == (record["a"] if a_wins else record["b"])
        assert row["chosen"][0]["role"] == "assistant" and row["prompt"][0]["role"] == "user"
        assert len(row["principle_ids"]) == len(row["p_chosen_by_principle"]) == len(row["p_chosen_as_a"]) == 2
        per_principle = [(x + y) / 2 for x, y in zip(row["p_chosen_as_a"], row["p_chosen_as_b"])]
        assert per_principle == pytest.approx(row["p_chosen_by_principle"], abs=1e-6)
        assert {row["chosen_id"], row["rejected_id"]} == {record["a_id"], record["b_id"]}
        assert row["pair_id"] == f"{row['prompt_id']}-{record['a_id'][-1]}-{record['b_id'][-1]}"


def test_the_report_has_bias_statistics_histogram_agreement_and_time(sampled_run):
    out, result = sampled_run
    report = (out / "report.md").read_text()
    for heading in ("Position bias before averaging", "Label confidence", "Per-principle agreement", "Time"):
        assert f"## {heading}" in report
    assert "single-order verdict flips when the order is swapped" in report and "labels/s" in report
    assert (out / "label_confidence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = result.summary
    assert sum(s["confidence_histogram"]) == s["labels"]
    assert sum(row["n"] for row in s["per_principle"].values()) == 2 * s["labels"]
    assert 0 <= s["order_flip_rate"] <= 1 and 0 <= s["position_a_win_rate"] <= 1


def test_rerunning_a_finished_run_recomputes_nothing(sampled_run, tiny_loaded):
    out, first = sampled_run
    judge = ConstitutionalJudge(tiny_loaded, "default", JudgeConfig(principles=2, batch_size=8))
    again = run_labelling(judge, list(prompts_from_texts(PROMPTS)), SMALL, out_dir=out, progress=False)
    assert judge.stats.pairs == 0 and judge.generator.stats.generated_tokens == 0
    assert again.records == first.records and again.summary["labels_from_earlier_run"] == first.summary["labels"]


def test_a_different_config_on_the_same_folder_is_refused(sampled_run, judge):
    out, _ = sampled_run
    with pytest.raises(RunConfigError, match="samples: 3 in the run, 4 now"):
        run_labelling(judge, list(prompts_from_texts(PROMPTS)), LabelConfig(samples=4), out_dir=out, progress=False)


def test_pairs_per_prompt_draws_that_many_pairs(judge):
    result = run_labelling(judge, list(prompts_from_texts(PROMPTS[:2])),
                           LabelConfig(samples=4, pairs_per_prompt=2, sample_tokens=6), progress=False)
    s = result.summary
    assert s["labels"] + s["left_out_identical"] + s["left_out_empty"] == 4


# ---------------------------------------------------------------- pairs files


def _write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_pairs_files_in_every_format_get_soft_labels(judge, tmp_path):
    msg = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    files = {
        "plain": [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "id": 7}],
        "conversational": [{"prompt": msg("user", "Hi?"), "chosen": msg("assistant", "Hello!"),
                            "rejected": msg("assistant", "Go away.")}],
        "sl-cai": [{"prompt": msg("user", "Hi?"), "chosen": msg("assistant", "Hello!"),
                    "rejected": msg("assistant", "Go away."), "prompt_id": "abc", "principle_ids": ["tone"]}],
        "hh-rlhf": [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hey.\n\nHuman: And?\n\nAssistant: Hello!",
                     "rejected": "\n\nHuman: Hi?\n\nAssistant: Hey.\n\nHuman: And?\n\nAssistant: Go away."}],
    }
    for name, records in files.items():
        pairs = load_pairs(_write(tmp_path / f"{name}.jsonl", records + records))
        assert len(pairs) == 1 and pairs.duplicates == 1
        result = run_labelling(judge, pairs, out_dir=tmp_path / name, progress=False)
        row = result.preference[0]
        assert row["agrees_with_input"] == (row["chosen_id"] == "input-chosen")
        assert result.summary["agreement_with_input"] == float(row["agrees_with_input"])
        assert {json.dumps(row["chosen"]), json.dumps(row["rejected"])} == {
            json.dumps(pairs.pairs[0].a), json.dumps(pairs.pairs[0].b)}
        if name == "plain":
            assert row["id"] == 7 and row["prompt"] == "Hi?"
        if name == "sl-cai":
            assert row["input_prompt_id"] == "abc" and row["input_principle_ids"] == ["tone"]
        if name == "hh-rlhf":
            assert row["prompt"] == msg("user", "Hi?") + msg("assistant", "Hey.") + msg("user", "And?")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, "field 'rejected': missing"),
    ({"prompt": "q", "rejected": "b", "chosen": "   "}, "field 'chosen': is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": 5}, "field 'rejected': is int 5"),
    ({"question": "q", "chosen": "a", "rejected": "b"}, "field 'prompt': missing"),
    ("[1, 2]", "is a JSON list, not an object"),
    ("{oops", "not valid JSON"),
])
def test_bad_pairs_files_name_the_line_and_field(tmp_path, record, message):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(PairLoadError, match=f"pairs.jsonl:2: .*{message}"):
        load_pairs(path)
    assert load_pairs(path, on_error="skip").malformed == 1


@pytest.mark.parametrize("seed", range(3))
def test_pairs_read_as_a_stream_equal_a_whole_file_read(tmp_path, seed):
    rng = random.Random(seed)
    records = [{"prompt": f"q{rng.randint(0, 9)}", "chosen": rng.choice(["a", "a\u2028b", "c"]), "rejected": "d"}
               for _ in range(40)]
    blank = lambda: "\n" if rng.random() < 0.1 else ""  # noqa: E731
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" + blank() for r in records), encoding="utf-8")
    whole = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
    expected, seen = [], set()
    for record in whole:  # the first of each distinct pair
        if json.dumps(record, sort_keys=True) not in seen:
            seen.add(json.dumps(record, sort_keys=True))
            expected.append(record)
    pairs = load_pairs(path)
    for _ in range(2):  # iterating reads the file again
        assert [(p.prompt, p.a, p.b) for p in pairs] == [(r["prompt"], r["chosen"], r["rejected"]) for r in expected]
    assert len(pairs) == len(expected) and pairs.duplicates == len(whole) - len(expected)


def test_hh_transcripts_split_at_their_last_shared_assistant_turn():
    chosen = "\n\nHuman: Is that drag kings?\n\nAssistant: No. Kings are...\n\nHuman: Oh.\n\nAssistant: Yes."
    rejected = "\n\nHuman: Is that drag kings?\n\nAssistant: Maybe."
    prompt, a, b = split_transcripts(chosen, rejected, "x.jsonl:1")
    assert prompt == [{"role": "user", "content": "Is that drag kings?"}]
    assert a[0]["content"] == "No. Kings are...\n\nHuman: Oh.\n\nAssistant: Yes." and b[0]["content"] == "Maybe."


def test_a_pairs_file_mixing_formats_is_refused(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}])
    with pytest.raises(PairLoadError, match="mixed.jsonl:2: field 'prompt': mixes plain-string and conversational"):
        load_pairs(path)


# ---------------------------------------------------------------- the command

FAST = ["--samples", "3", "--sample-tokens", "6", "--principles", "2", "--batch-size", "4", "--quiet"]


def test_label_help_covers_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["label", "--help"])
    out = capsys.readouterr().out
    for action in make_parser()._subparsers._group_actions[0].choices["label"]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.option_strings[0] in out


def test_label_errors_are_one_line(tmp_path, capsys):
    path = _write(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a"}])
    for args, expected in ((["--pairs", path], "pairs.jsonl:1: field 'rejected': missing"),
                           (["--principle-ids", "nope"], "no principle 'nope'"),
                           (["--aggregate", "max"], "aggregate must be one of prob, logodds")):
        assert main(["label", "--out", str(tmp_path / "out"), *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("stop", STOPS)
def test_kill_and_resume_gives_the_uninterrupted_result(tiny_model_path, tmp_path, stop):
    common = [sys.executable, "-m", "cai_fast.cli", "label", "--model", str(tiny_model_path), "--limit", "8", *FAST]
    full = subprocess.Popen([*common, "--out", str(tmp_path / "full")], env=ENV, cwd=tmp_path,  # meanwhile
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*common, "--out", str(out)], env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = out / "labels-00000.jsonl"
    # SIGTERM cuts off the batch still being synced (one label here): 3 seen leave at least 2
    kill_when(proc, lambda: line_count(shard) >= 3, "3 labels were written", stop=stop)
    written = line_count(shard)
    assert full.wait(timeout=300) == 0, full.stderr.read()
    total = len((tmp_path / "full" / "labels-00000.jsonl").read_text().splitlines())
    assert 2 <= written < total, f"the kill came too late to test anything ({written} of {total} labels)"

    resumed = subprocess.run([*common, "--out", str(out)], capture_output=True, text=True, env=ENV,
                             cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({written} from an earlier run)" in resumed.stdout
    for name, key in (("samples-00000.jsonl", "prompt_id"), ("labels-00000.jsonl", "pair_id"),
                      ("preference/train-00000.jsonl", "pair_id")):
        a = [json.loads(x) for x in (tmp_path / "full" / name).read_text().splitlines()]
        b = [json.loads(x) for x in (out / name).read_text().splitlines()]
        assert sorted(a, key=lambda r: r[key]) == sorted(b, key=lambda r: r[key]), name
