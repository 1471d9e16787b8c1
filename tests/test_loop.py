"""The pipeline: the early-stopping rule on scripted scores, config files and their errors, held-apart
training prompts, and a real SIGKILL of `cai-fast pipeline` on the tiny model, resumed to the same end
as an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from cai_fast.cli import main
from cai_fast.evaluate import load_eval_sets
from cai_fast.pipeline.rounds import (
    Pipeline, best_round, helpful_prompts, iterate_rounds, quality_of, run_pipeline, should_stop, training_prompts,
)
from cai_fast.pipeline.config import ConfigFileError, config_from_dict, load_pipeline_config
from cai_fast.pipeline.gate import FALLBACKS, reward_gate
from cai_fast.store import RunConfigError

from helpers.processes import STOPS, kill_when
from helpers.tiny import TINY_PIPELINE, write_tiny_pipeline_config


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# ---------------------------------------------------------------- early stop


@pytest.mark.parametrize("scores, rounds, tolerance, ran, stopped, best", [
    ([0.6, 0.7, 0.64, 0.9], 4, 0.05, 3, True, 2),  # 0.64 < 0.7·0.95: stop; round 4 never runs; keep round 2
    ([0.6, 0.58, 0.56, 0.55], 4, 0.05, 4, False, 1),  # every drop is under 5%: all rounds; the best is the first
    ([0.5, 0.4], 2, 0.05, 2, True, 1),  # the last round stops: still reported as stopped
    ([0.7, 0.7, 0.7], 3, 0.05, 3, False, 1),  # ties keep the earliest round
    ([0.5, 0.499], 3, 0.0, 2, True, 1),  # tolerance 0: any drop stops
    ([0.5, 0.476, 0.6], 3, 0.05, 3, False, 3),  # a 4.8% drop continues, and a later round can win
    ([0.3], 1, 0.05, 1, False, 1),
])
def test_early_stop_on_scripted_scores(scores, rounds, tolerance, ran, stopped, best):
    calls = []

    def run_round(r: int) -> float:
        calls.append(r)
        return scores[r - 1]

    outcome = iterate_rounds(run_round, rounds, tolerance)
    assert calls == list(range(1, ran + 1))
    assert outcome.qualities == scores[:ran] and outcome.stopped_early is stopped and outcome.best_round == best


def test_should_stop_and_best_round_edges():
    assert not should_stop([], 0.05) and not should_stop([0.2], 0.05) and not should_stop([0.0, 0.0], 0.05)
    assert should_stop([0.8, 0.759], 0.05) and not should_stop([0.8, 0.761], 0.05)
    assert best_round([0.1, 0.3, 0.3, 0.2]) == 2


def test_quality_is_the_weighted_mean_of_the_measures():
    figures = {"harmlessness": {"win_rate": 0.8}, "helpfulness": {"win_rate": 0.4}, "over_refusal": {"rate": 0.25},
               "alignment_tax": {"mean_aligned": 0.5}}
    assert quality_of(figures, {"harmlessness": 1.0}) == 0.8
    assert quality_of(figures, {"harmlessness": 3, "helpfulness": 1}) == pytest.approx(0.7)
    assert quality_of(figures, {"compliance": 1, "capability": 1}) == pytest.approx(0.625)


# ---------------------------------------------------------------- config files


def test_the_shipped_demo_config_loads_and_its_sizes_fit_the_shipped_prompt_sets():
    config, text = load_pipeline_config("demo")
    assert "[sl_cai]" in text and config.rounds == 1 and config.method == "ppo"
    sets = load_eval_sets(config.eval)  # no set smaller than asked for (which would shrink it silently)
    assert [len(sets.harmless), len(sets.helpful), len(sets.over_refusal)] == [
        config.eval.harmless_size, config.eval.helpful_size, config.eval.over_refusal_size]
    assert len(training_prompts(config, sets)) == config.train_size


@pytest.mark.parametrize("text, field, problem", [
    ("round = 2\n", "'round'", "unknown field"),
    ("[sft]\nmax_step = 3\n", "'sft.max_step'", "unknown field"),
    ("[sft]\nlr = \"fast\"\n", "'sft.lr'", "must be a number"),
    ("[sl_cai]\nrounds = 2.5\n", "'sl_cai.rounds'", "must be an integer"),
    ("[eval]\nharmless_size = true\n", "'eval.harmless_size'", "must be an integer"),
    ("[eval]\nbenchmarks = [1, 2]\n", "'eval.benchmarks'", "a string or a list of strings"),
    ("[ppo]\nreward_model = \"rm\"\n", "'ppo.reward_model'", "set by the pipeline"),
    ("[sft]\nmodel = \"x\"\n", "'sft.model'", "set by the pipeline"),
    ("[ppo]\nreward_source = \"judge\"\n", "'ppo.reward_source'", "set by the pipeline"),
    ("rounds = 7\n", "rounds", "between 1 and 4"),
    ("[sl_cai]\nrounds = 0\n", "[sl_cai] rounds", "between 1 and 4"),
    ("[reward]\neval_fraction = 1.5\n", "[reward] eval_fraction", "in [0, 1)"),
    ("quality = \"harmlesness\"\n", "quality", "unknown measure 'harmlesness'"),
    ("quality = {harmlessness = \"high\"}\n", "'quality.harmlessness'", "must be a number"),
    ("quality = \"capability\"\n", "capability", "eval.benchmarks names no benchmark"),
    ("method = \"grpo\"\n", "method", "must be one of"),
    ("on_weak_reward = \"hope\"\n", "on_weak_reward", "must be one of ('sft', 'dpo', 'ppo')"),
    ("[reward]\neval_fraction = 0\n", "reward_bar", "needs held-out pairs"),
    ("[sl_cai]\nmin_kept = -1\n", "[sl_cai] min_kept", "must be >= 0"),
    ("sft = 3\n", "[sft]", "must be a table"),
    ("rounds = = 2\n", "", "not valid TOML"),
])
def test_config_file_errors_name_the_file_and_the_field(tmp_path, text, field, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as err:
        load_pipeline_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and field in message and problem in message, message


def test_config_errors_end_the_command_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[sft]\nmax_step = 3\n")
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cai-fast: error: ") and "sft.max_step" in err and str(path) in err and "\n" not in err
    assert main(["pipeline", "--config", str(tmp_path / "absent.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_json_and_toml_configs_are_the_same(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('rounds = 2\nquality = {harmlessness = 2, helpfulness = 1}\n[ppo]\nkl_coef = 0.1\n'
                    '[eval]\nbenchmarks = ["a.jsonl", "b.json"]\n')
    data = {"rounds": 2, "quality": {"harmlessness": 2, "helpfulness": 1}, "ppo": {"kl_coef": 0.1},
            "eval": {"benchmarks": ["a.jsonl", "b.json"]}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    from_toml, from_json = load_pipeline_config(toml)[0], load_pipeline_config(tmp_path / "c.json")[0]
    assert from_toml == from_json == config_from_dict(data, "inline")
    assert from_toml.quality_weights == {"harmlessness": 2.0, "helpfulness": 1.0}
    assert from_toml.eval.benchmark_paths == ["a.jsonl", "b.json"] and from_toml.ppo.kl_coef == 0.1


def test_training_prompts_are_held_apart_from_every_evaluation_prompt():
    config = config_from_dict({"train_size": 0, "eval": {"harmless_size": 20}}, "inline")
    sets = load_eval_sets(config.eval)
    train = training_prompts(config, sets)
    assert len(train) == 108 - 20 and not {p.id for p in train} & sets.prompt_ids()
    assert len(training_prompts(replace(config, train_size=5), sets)) == 5


def test_the_helpful_mix_holds_the_evaluation_prompts_apart_too():
    config = config_from_dict({"sl_cai": {"helpful_mix": 1.0, "helpful_prompts": "benign"}}, "inline")
    sets = load_eval_sets(config.eval)  # the helpfulness win-rate's prompts are drawn from "benign" too
    mixed = helpful_prompts(config, sets)
    assert mixed and len(mixed) == 50 - len(sets.helpful) - len(sets.over_refusal)
    assert not {p.id for p in mixed} & sets.prompt_ids()
    assert helpful_prompts(replace(config, sl_cai=replace(config.sl_cai, helpful_mix=0.0)), sets) == []


def test_another_config_on_the_same_run_folder_is_refused(tmp_path, tiny_model_path):
    config = config_from_dict({"out": str(tmp_path), "model": str(tiny_model_path)}, "inline")
    Pipeline(replace(config, rounds=3), progress=False)  # not started (no state.json): takes the next config
    Pipeline(config, progress=False).state.update(finished=False)  # started
    with pytest.raises(RunConfigError, match="rounds: 1 in the run, 2 now"):
        Pipeline(replace(config, rounds=2), progress=False)


# ---------------------------------------------------------------- kill and resume

def _approx_equal(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _approx_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _approx_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not (math.isnan(a) and math.isnan(b)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where
    elif not isinstance(a, float):
        assert a == b, where


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# The outputs that must not depend on whether the run was interrupted (times and paths may).
COMPARED = ["round-{r}/sl_cai/sft_messages/train-00000.jsonl", "round-{r}/label/labels/preference/train-00000.jsonl",
            "round-{r}/sft/metrics.jsonl", "round-{r}/reward/metrics.jsonl", "round-{r}/ppo/metrics.jsonl",
            "round-{r}/evaluate/outputs/outputs.json", "round-{r}/depth/rungs-00000.jsonl"]


@pytest.mark.parametrize("correct, n, bar, passed", [
    (10, 12, 0.5, True),  # 95% interval 0.55-0.95
    (9, 12, 0.5, False),  # 0.47-0.91: not told from chance at 12 pairs
    (6, 12, 0.5, False), (6, 12, 0.0, True), (0, 0, 0.5, False), (150, 200, 0.65, True), (150, 200, 0.7, False),
])
def test_the_reward_gate_lets_ppo_run_only_on_a_reward_model_told_from_chance(correct, n, bar, passed):
    summary = {"eval_accuracy": correct / n if n else float("nan"), "eval_decided_pairs": n}
    for fallback in FALLBACKS:
        gate = reward_gate(summary, bar, fallback)
        assert gate["passed"] is passed and gate["policy"] == ("ppo" if passed else fallback)
        assert 0 <= gate["interval"][0] <= gate["interval"][1] <= 1 and f"n={n}" in gate["reason"]
        assert ("cannot be told from chance" in gate["reason"]) is not passed


def test_a_round_without_enough_replies_or_a_telling_reward_model_keeps_its_starting_policy(tmp_path, tiny_model_path):
    """The filter and the reward gate on (the defaults): none of the tiny model's 5-token revisions is
    a finished reply, so SFT does not run; its reward model is at chance, so PPO does not either."""
    path = write_tiny_pipeline_config(tmp_path, "gated", tiny_model_path)
    path.write_text(path.read_text().replace("reward_bar = 0\n", "").replace("filter = false\n", "")
                    .replace("rounds = 2\n", "rounds = 1\n", 1))
    config, source = load_pipeline_config(path)
    outcome = run_pipeline(config, source=source, progress=False)
    state = json.loads((tmp_path / "gated" / "state.json").read_text())
    stages = state["rounds"]["1"]["stages"]
    assert stages["sl_cai"]["summary"]["revisions"]["kept"] == 0 and stages["sl_cai"]["summary"]["too_few"]
    assert "skipped" in stages["sft"]["summary"] and not (tmp_path / "gated" / "round-1" / "sft").exists()
    assert stages["reward_gate"]["summary"]["passed"] is False and "ppo" not in stages
    assert not (tmp_path / "gated" / "round-1" / "ppo").exists()
    assert outcome["best_policy"] == str(tiny_model_path)  # nothing trained: the round's policy is the start
    report = (tmp_path / "gated" / "report.md").read_text()
    assert "**SFT did not run**: only 0 final revisions are replies" in report
    assert "**round 1: the reward model cannot be told from chance" in report
    assert "- **round 1: SFT did not run: only 0 final revisions are replies" in report
    assert "a final revision judged *" in report


def test_a_d_rlaif_round_trains_ppo_on_the_direct_score_and_its_report_says_so(tmp_path, tiny_model_path):
    """method = "d-rlaif": no labels, no reward model, no gate; PPO's reward is the judge's direct score."""
    path = write_tiny_pipeline_config(tmp_path, "direct", tiny_model_path)
    path.write_text(path.read_text().replace("rounds = 2\n", "rounds = 1\nmethod = \"d-rlaif\"\n", 1))
    config, source = load_pipeline_config(path)
    outcome = run_pipeline(config, source=source, progress=False)
    stages = json.loads((tmp_path / "direct" / "state.json").read_text())["rounds"]["1"]["stages"]
    assert not {"label", "reward", "reward_gate"} & stages.keys() and stages["ppo"]["status"] == "done"
    reward = stages["ppo"]["summary"]["reward"]
    assert reward["source"] == "judge" and reward["judge_model"] == str(tiny_model_path) and reward["principles"] == 1
    assert outcome["best_policy"] == str(tmp_path / "direct" / "round-1" / "ppo")
    report = (tmp_path / "direct" / "report.md").read_text()
    assert "method: d-rlaif" in report and "round 1: PPO's reward was the direct score (d-RLAIF) of judge" in report
    assert (tmp_path / "direct" / "figures" / "training_curves.png").is_file()


def test_the_judge_is_checked_against_people_in_each_dtype_asked_for(tmp_path, tiny_model_path):
    from cai_fast.pipeline.measures import _judge

    path = write_tiny_pipeline_config(tmp_path, "dtypes", tiny_model_path)
    path.write_text(path.read_text().replace("human_size = 2\n", "human_size = 2\nhuman_dtypes = \"float32,bfloat16\"\n")
                    .replace("rounds = 2\n", "rounds = 2\nlabel_dtype = \"auto\"\n", 1))
    config, _ = load_pipeline_config(path)
    pipeline = Pipeline(config, progress=False)
    summary = pipeline.judge_check()
    pipeline.state.update_stage(0, "judge_check", status="done", seconds=0, summary=summary)
    assert pipeline.label_dtype() == summary["label_dtype"] and summary["label_dtype"]["dtype"] in summary["by_dtype"]
    assert list(summary["by_dtype"]) == ["float32", "bfloat16"]
    for dtype, check in summary["by_dtype"].items():
        assert check["n"] == 2 and check["seconds"] >= 0 and 0 <= check["agreement"]["rate"] <= 1
        # the run's own dtype is the main check, not judged again
        assert (tmp_path / "dtypes" / "round-0" / "judge_check" / dtype).is_dir() == (dtype != pipeline.precision["dtype"])
    same = summary["by_dtype"][pipeline.precision["dtype"]]  # the run's own dtype judges the same labels
    assert same["agreement"] == summary["agreement"] and same["chosen_first"] == summary["chosen_first"]
    lines, _ = _judge([], {}, summary, tmp_path / "figures")
    assert sum(line.startswith(("| float32 | ", "| bfloat16 | ")) for line in lines) == 2
    assert any(line.startswith("label_dtype = auto: the RLAIF labels are judged in **") for line in lines)
    with pytest.raises(ValueError, match="label_dtype = \"auto\" chooses by the judge's agreement"):
        replace(config, label_dtype="auto", eval=replace(config.eval, human_dtypes=""))
    with pytest.raises(ValueError, match="human_dtypes: float64 is not a dtype"):
        replace(config.eval, human_dtypes="float32,float64")


@pytest.mark.parametrize("rates, chosen", [
    ({"bfloat16": (0.540, 0.035), "float32": (0.580, 0.035)}, "bfloat16"),  # +4 points, se of the difference 5
    ({"bfloat16": (0.540, 0.010), "float32": (0.580, 0.010)}, "float32"),
    ({"bfloat16": (0.600, 0.010), "float32": (0.580, 0.010)}, "bfloat16"),
    ({"float32": (0.600, 0.010)}, "float32"),  # the run's dtype was not checked: the best checked one
])
def test_label_dtype_auto_switches_only_for_agreement_beyond_the_standard_error(rates, chosen):
    from cai_fast.pipeline.gate import label_dtype_choice

    by_dtype = {d: {"agreement": {"rate": r, "stderr": se}} for d, (r, se) in rates.items()}
    choice = label_dtype_choice(by_dtype, "bfloat16")
    assert choice["dtype"] == chosen and choice["reason"]


@pytest.mark.parametrize("stop", STOPS)
def test_a_killed_pipeline_resumes_where_it_stopped_and_ends_like_an_uninterrupted_run(
        tmp_path, tiny_model_path, stop):
    whole, killed = (write_tiny_pipeline_config(tmp_path, name, tiny_model_path) for name in ("whole", "killed"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1), so that the numbers match
    try:
        config, source = load_pipeline_config(whole)
        expected = run_pipeline(config, source=source, progress=False)
    finally:
        torch.set_num_threads(threads)

    command = [sys.executable, "-m", "cai_fast.cli", "pipeline", "--config", str(killed), "--quiet"]
    process = subprocess.Popen(command, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    metrics = tmp_path / "killed" / "round-1" / "sft" / "metrics.jsonl"
    kill_when(process, metrics.exists, "SFT of round 1 began", timeout=120, stop=stop)
    state = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert not state["finished"] and state["rounds"]["1"]["stages"]["sl_cai"]["status"] == "done"
    unfinished = [(r, s) for r, e in state["rounds"].items() for s, v in e["stages"].items() if v["status"] != "done"]
    assert len(unfinished) == 1  # the stage the kill interrupted

    resumed = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    r, stage = unfinished[0]
    assert f"round {r} {stage}: resuming" in resumed.stdout and "round 1 sl_cai: complete" in resumed.stdout
    final = json.loads((tmp_path / "killed" / "state.json").read_text())
    assert final["rounds"][r]["stages"][stage]["resumed"] is True
    assert final["best_round"] == expected["best_round"] and final["stopped_early"] == expected["stopped_early"]
    _approx_equal(final["qualities"], expected["qualities"], "qualities")
    for r in (1, 2):
        for name in COMPARED:
            path = name.format(r=r)
            a, b = (tmp_path / run / path for run in ("killed", "whole"))
            _approx_equal(json.loads(a.read_text()) if a.suffix == ".json" else _jsonl(a),
                          json.loads(b.read_text()) if b.suffix == ".json" else _jsonl(b), path)

    report = (tmp_path / "killed" / "report.md").read_text()
    assert f"Report: {tmp_path / 'killed' / 'report.md'}" in resumed.stdout
    assert "resumed after an interruption" in report and TINY_PIPELINE.splitlines()[2] in report
    assert all(final["rounds"][str(r)]["stages"]["evaluate_sft"]["status"] == "done" for r in (1, 2))
    assert "\n| 1 after SFT | " in report and "\n| 2 | " in report and "\n| round 2 after SFT | " in report
    assert final["rounds"]["0"]["stages"]["judge_check"]["summary"]["n"] == 2
    assert [row["k"] for row in final["rounds"]["0"]["stages"]["depth"]["summary"]["curve"]] == [0, 2]
    for png in ("training_curves", "win_rates", "over_refusal", "alignment_tax", "safety", "lengths", "depth",
                "judge_calibration"):
        assert (tmp_path / "killed" / "figures" / f"{png}.png").stat().st_size > 1000
