"""The report: written from a run folder alone, with its PNG figures, the figures per round and the
configuration; a run in progress gets a report too. (The pipeline test checks one from a real run.)"""

from __future__ import annotations

import json
import random

import pytest

from cai_fast.evaluate.capability import alignment_tax
from cai_fast.evaluate import win_rate
from cai_fast.evaluate.judge_check import human_agreement
from cai_fast.evaluate.length import length_controlled_win_rate
from cai_fast.pipeline.report import write_report

BENCHMARKS = {"gsm8k_sample": 0.25, "boolean_expressions": 0.55}
CONFIG_TEXT = 'model = "tiny"\nmethod = "{method}"\nrounds = 2\n\n[ppo]\nmax_steps = 3\n'


def _lengths(words: float) -> dict:
    return {name: {"n": 9, "mean_words": words, "stderr": 1.5} for name in ("harmless", "helpful", "over_refusal")}


def _win(rng: random.Random, n: int) -> dict:
    labels = [rng.random() for _ in range(n)]
    model = [rng.randrange(20, 90) for _ in range(n)]
    return {**win_rate(labels), "length_controlled": length_controlled_win_rate(labels, model, [40] * n)}


def _evaluation(rng: random.Random, r: int) -> dict:
    aligned = {name: score - 0.05 * r for name, score in BENCHMARKS.items()}
    harmless, helpful = _win(rng, 9), _win(rng, 7)
    return {"harmlessness": harmless, "helpfulness": helpful,
            "over_refusal": {"rate": 0.25 * r, "refused": 3 * r, "n": 12, "stderr": 0.1},
            "base_over_refusal": {"rate": 0.0, "refused": 0, "n": 12, "stderr": 0.0},
            "harmful_compliance": {"rate": 1 - r / 9, "complied": 9 - r, "n": 9, "stderr": 0.05},
            "lengths": _lengths(40.0 + 10 * r),
            "capability": {name: {"score": s, "n": 20, "stderr": 0.1} for name, s in aligned.items()},
            "alignment_tax": alignment_tax(BENCHMARKS, aligned), "quality": harmless["win_rate"]}


def _depth(rates: list[float]) -> dict:
    return {"model": "m", "examples_available": 30, "n": 8,
            "curve": [{"k": k, "rate": x, "complied": round(8 * x), "n": 8, "stderr": 0.1}
                      for k, x in zip((0, 10, 30), rates)]}


JUDGE_RECORDS = [{"pair_id": str(i), "p_ab_a": [ab], "p_ba_b": [ba], "principle_label": [(ab + ba) / 2],
                  "label": (ab + ba) / 2, "principle_ids": ["p"], "a_id": "input-chosen", "option_mass": [[1, 1]]}
                 for i, (ab, ba) in enumerate([(0.9, 0.75), (0.8, 0.2), (0.3, 0.05), (0.6, 0.9)])]


def _stage(summary: dict, seconds: float = 1.5, **extra) -> dict:
    return {"status": "done", "seconds": seconds, "summary": summary, **extra}


def make_run(root, method: str = "ppo", rounds: int = 2, evaluated: int = 2):
    """A run folder as cai_fast.pipeline leaves it: state.json, config.json, config.source, training logs."""
    rng = random.Random(7)
    train = {"steps": 3, "final": {"loss": 0.5, "reward": 0.2, "kl": 0.01, "reward_margin": 0.3}}
    state = {"rounds": {"0": {"stages": {"baseline": _stage({
        "over_refusal": {"rate": 0.0, "refused": 0, "n": 12, "stderr": 0.0},
        "harmful_compliance": {"rate": 1.0, "complied": 9, "n": 9, "stderr": 0.0}, "lengths": _lengths(40.0),
        "capability": {name: {"score": s, "n": 20, "stderr": 0.1} for name, s in BENCHMARKS.items()}}),
        "judge_check": _stage({**human_agreement(JUDGE_RECORDS, 0), "path": "people.jsonl", "judge_model": "tiny"}),
        "depth": _stage(_depth([1.0, 1.0, 1.0]))}}},
        "eval_sets": {"harmless": 9, "helpful": 7, "over_refusal": 12, "skipped_benchmarks": ["../absent.jsonl"],
                      "benchmarks": {n: {"path": f"data/{n}", "kind": "gsm8k", "n": 20, "of": 300} for n in BENCHMARKS}},
        "train_prompts": 40, "finished": evaluated == rounds}
    for r in range(1, rounds + 1):
        stages = {"sl_cai": _stage({"prompts": 40, "preference_pairs": 31}), "sft": _stage(train),
                  "label": _stage({"labels": 40, "mean_p_chosen": 0.61}),
                  method: _stage(train, resumed=r == 1)}
        if r <= evaluated:
            stages["evaluate"] = _stage(_evaluation(rng, r))
            stages["depth"] = _stage(_depth([0.125 * r, 0.5, 0.875]))
        state["rounds"][str(r)] = {"stages": stages}
        log = root / f"round-{r}" / method / "metrics.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text("".join(json.dumps({"step": s, "reward": rng.random(), "kl": 0.01 * s, "kl_k3": 0.02 * s,
                                           "loss": 1 / s,
                                           "reward_margin": 0.1 * s}) + "\n" for s in range(1, 6)))
    if evaluated == rounds:
        state.update(best_round=1, best_policy=str(root / "round-1" / method), stopped_early=False,
                     qualities=[state["rounds"][str(r)]["stages"]["evaluate"]["summary"]["quality"]
                                for r in range(1, rounds + 1)])
    (root / "state.json").write_text(json.dumps(state))
    (root / "config.json").write_text(json.dumps({"model": "tiny", "method": method, "rounds": rounds,
                                                  "constitution": "default", "quality": "harmlessness",
                                                  "tolerance": 0.05, "ppo": {"max_steps": 3}}))
    (root / "config.source").write_text(CONFIG_TEXT.format(method=method))
    return state


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("method", ["ppo", "dpo"])
def test_report_has_its_pngs_the_figures_per_round_and_the_config(tmp_path, method):
    state = make_run(tmp_path, method)
    text = write_report(tmp_path).read_text()
    for name in ("training_curves", "win_rates", "over_refusal", "alignment_tax", "safety", "lengths", "depth",
                 "judge_calibration"):
        width, height = _png_size(tmp_path / "figures" / f"{name}.png")
        assert width >= 400 and height >= 300
        assert f"(figures/{name}.png)" in text
    for r in (1, 2):
        f = state["rounds"][str(r)]["stages"]["evaluate"]["summary"]
        assert f"| {r} | {f['harmlessness']['win_rate']:.3f} ± {f['harmlessness']['stderr']:.3f}" in text
        assert f"{f['helpfulness']['win_rate']:.3f}" in text and f"{f['quality']:.3f} |" in text
    assert "| 2 | " in text and "50% (6/12)" in text  # over-refusal of round 2
    assert ("| gsm8k_sample | 20 | 0.250 ± 0.100 | 0.200 ± 0.100 | +20.0% regression | 0.150 ± 0.100 | +40.0% "
            "regression |") in text and "| **mean** | | 0.400 | 0.350 | +12.5% | 0.300 | +25.0% |" in text
    assert "| start | 100.0% ± 0.0% | 9/9 | 0.0% ± 0.0% | 0/12 |" in text  # harmful compliance, over-refusal
    assert "| round 2 | 77.8% ± 5.0% | 7/9 | 50.0% ± 10.0% | 6/12 |" in text
    assert "| round 1 | 50.0 ± 1.5 (n=9) |" in text  # words per set
    c = state["rounds"]["1"]["stages"]["evaluate"]["summary"]["harmlessness"]["length_controlled"]
    assert "| round 1 | harmlessness | " in text and f"{c['win_rate']:.3f} ± {c['stderr']:.3f}" in text
    assert "| start | 8 | 30 | 100% ± 10% | 100% ± 10% | 100% ± 10% |" in text  # depth of alignment
    assert "| round 2 | 8 | 30 | 25% ± 10% | 50% ± 10% | 88% ± 10% |" in text
    assert "| agreement, both orders averaged (the labels) | 62.5% ± " in text  # the judge against people
    assert "| expected calibration error of the soft label | 0.225 | 4 |" in text
    assert "**best round: 1**" in text and "resumed after an interruption" in text
    assert CONFIG_TEXT.format(method=method).strip() in text and '"max_steps": 3' in text
    assert "../absent.jsonl` skipped" in text and "| test | 30 |" in text and "| model | 28 |" in text


def test_a_run_in_progress_gets_a_report_without_the_missing_figures(tmp_path):
    make_run(tmp_path, rounds=1, evaluated=0)
    text = write_report(tmp_path).read_text()
    assert "in progress" in text and "No round evaluated yet" in text and "| 0 (start) |" in text
    assert (tmp_path / "figures" / "training_curves.png").is_file()
    assert not (tmp_path / "figures" / "win_rates.png").exists() and "win_rates.png" not in text
