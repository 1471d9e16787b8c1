"""The pipeline's report: RUN/report.md and its PNG figures in RUN/figures/, from the run folder alone.

    write_report(run_dir) -> Path of report.md

Reads state.json (stages, wall times, evaluation figures per round; see cai_fast.pipeline), config.json and
config.source (the configuration, shown in full at the end) and each round's training log (metrics.jsonl of its
ppo or dpo stage). The figures are listed in `write_report`; a figure without data yet (no round evaluated, no
benchmark) is left out and the text says so. The report is rewritten after every round, so a run in progress
has one too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..evaluate.refusal import detector_scores, load_refusal_examples
from ..plots import curves_png, grouped_bars_png
from ..revisions import revisions_line
from ..store import write_atomic
from .config import RL_STAGES

SPLITS = ("dev", "test", "model", "revision")  # of the refusal detector's labelled set
_KL = {"kl": "KL to the SFT policy (per response)", "kl_k3": "KL to the SFT policy, k3 estimate (≥ 0)"}
CURVES = {"ppo": {"reward": "reward (mean reward-model score)", **_KL},  # by method
          "d-rlaif": {"reward": "reward (mean direct score − 5)", **_KL},
          "dpo": {"reward_margin": "implicit reward margin (chosen − rejected)", "loss": "DPO loss"}}


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and figures/*.png for the run folder; returns the report's path.

    Figures:
        training_curves.png   PPO: reward and KL per step (the penalty's k1 estimate and the k3 one, ≥ 0);
                              DPO: reward margin and loss; a line per round
        win_rates.png         harmlessness and helpfulness win-rates against the starting model per round,
                              raw and at equal length
        over_refusal.png      over-refusal of the starting model and of each round
        alignment_tax.png     (base − aligned) / base per benchmark, a bar per round
        safety.png, lengths.png, depth.png, judge_calibration.png   see cai_fast.pipeline.measures
    """
    root = Path(run_dir)
    state = json.loads((root / "state.json").read_text(encoding="utf-8"))
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    rounds = evaluated_rounds(state)
    figures = draw_figures(root, state, config, rounds)
    measures, drawn = _measures(root, state, rounds)
    figures.update(drawn)
    lines = [*_headline(root, state, config, rounds), *_results(state, rounds), *_figures(figures),
             *_tax_table(state, rounds), *measures, *_training(state, config), *_detector(), *_eval_sets(state),
             *_times(state), *_configuration(root, config)]
    path = root / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def evaluated_rounds(state: dict) -> list[int]:
    """Rounds (1..) whose evaluation is complete, in order."""
    return sorted(int(r) for r, entry in state["rounds"].items()
                  if int(r) > 0 and entry.get("stages", {}).get("evaluate", {}).get("status") == "done")


def _measures(root: Path, state: dict, rounds: list[int]) -> tuple[list[str], dict[str, Path]]:
    """The sections and PNGs of cai_fast.pipeline.measures, from the baseline, rounds, depth and judge check."""
    from .measures import measure_report

    base = _baseline(state)
    models = ([("start", base)] if base else []) + [row for r in rounds for row in _evaluated(state, r, "round ")]
    depth = {("start" if r == 0 else f"round {r}"): s for r in range(len(state["rounds"]))
             if (s := _done(state, r, "depth")) is not None}
    return measure_report(models, depth, _done(state, 0, "judge_check"), root / "figures")


def _done(state: dict, r: int, stage: str) -> dict | None:
    entry = state["rounds"].get(str(r), {}).get("stages", {}).get(stage, {})
    return entry.get("summary") if entry.get("status") == "done" else None


def _evaluated(state: dict, r: int, prefix: str = "") -> list[tuple[str, dict]]:
    """[(label, figures)] of round r: its SFT policy's where the round evaluated it, then its policy's."""
    sft = _done(state, r, "evaluate_sft")
    return ([(f"{prefix}{r} after SFT", sft)] if sft else []) + [(f"{prefix}{r}", _figures_of(state, r))]


def _figures_of(state: dict, r: int) -> dict:
    return state["rounds"][str(r)]["stages"]["evaluate"]["summary"]


def _baseline(state: dict) -> dict | None:
    return _done(state, 0, "baseline")


def _fmt(value, spec: str = ".3f", missing: str = "—") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


# ---------------------------------------------------------------- figures


def draw_figures(root: Path, state: dict, config: dict, rounds: list[int]) -> dict[str, Path]:
    """The PNGs that have data, by name."""
    out, drawn = root / "figures", {}
    curves = training_curves(root, state, config["method"])
    if curves:
        drawn["training curves"] = curves_png(curves, out / "training_curves.png", xlabel="step",
                                              title=f"{config['method'].upper()} training, per round")
    if not rounds:
        return drawn
    labels = [f"round {r}" for r in rounds]
    wins = {m: [_figures_of(state, r)[m]["win_rate"] for r in rounds] for m in ("harmlessness", "helpfulness")}
    wins.update({f"{m} at equal length": [_figures_of(state, r)[m].get("length_controlled", {}).get("win_rate")
                                          for r in rounds] for m in ("harmlessness", "helpfulness")})
    drawn["win-rates"] = grouped_bars_png(labels, wins, out / "win_rates.png", reference=0.5, ylim=(0, 1),
                                          ylabel="P(round ≻ start)",
                                          title="Win-rate against the starting model (0.5 = as good)")
    refusal = [_baseline(state)["over_refusal"]["rate"]] + [_figures_of(state, r)["over_refusal"]["rate"] for r in rounds]
    drawn["over-refusal"] = grouped_bars_png(["start"] + labels, {"over-refusal": refusal}, out / "over_refusal.png",
                                             ylabel="share refused", percent=True,
                                             title="Over-refusal on benign prompts that look dangerous")
    benchmarks = list(_figures_of(state, rounds[0])["alignment_tax"]["benchmarks"])
    if benchmarks:
        taxes = {f"round {r}": [_figures_of(state, r)["alignment_tax"]["benchmarks"][b]["tax"] for b in benchmarks]
                 for r in rounds}
        drawn["alignment tax"] = grouped_bars_png(benchmarks, taxes, out / "alignment_tax.png", reference=0.0,
                                                  ylabel="(base − aligned) / base", percent=True,
                                                  title="Alignment tax per benchmark (> 0: regression)")
    return drawn


def training_curves(root: Path, state: dict, method: str) -> dict:
    """{metric label: {"round R": (steps, values)}} of each round's PPO or DPO log that exists."""
    curves = {label: {} for label in CURVES[method].values()}
    for r in sorted(int(k) for k in state["rounds"] if int(k) > 0):
        log = root / f"round-{r}" / RL_STAGES[method] / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
        for name, label in CURVES[method].items():
            points = [(row["step"], row[name]) for row in rows if name in row]
            if points:
                curves[label][f"round {r}"] = ([s for s, _ in points], [v for _, v in points])
    return {label: series for label, series in curves.items() if series}


# ---------------------------------------------------------------- sections


def _headline(root: Path, state: dict, config: dict, rounds: list[int]) -> list[str]:
    status = "finished" if state.get("finished") else "in progress (re-run the same command to continue)"
    lines = ["# Constitutional AI pipeline report", "",
             f"- run folder: `{root}`; status: {status}",
             f"- starting model: `{config['model']}`; method: {config['method']}; constitution: "
             f"`{config['constitution']}`; rounds evaluated: {len(rounds)} of {config['rounds']}",
             f"- quality (early stop, best round): `{config['quality']}`; a round that falls more than "
             f"{config['tolerance']:.0%} below the previous one stops the loop"]
    if "precision" in state:
        p = state["precision"]
        lines.append(f"- generation, judging and evaluation on `{p['device']}` in `{p['dtype']}` (device "
                     f"`{config.get('device', 'auto')}`, dtype `{config.get('dtype', 'auto')}` as configured)")
    for r in sorted(int(k) for k in state["rounds"]):
        reward = (_done(state, r, "ppo") or {}).get("reward")
        lines += [f"- round {r}: PPO's reward was {_reward_source(reward)}"] if reward else []
    lines += [f"- **round {r}: {why}**" for r, why in _stages_that_did_not_do_their_job(state)]
    if state.get("finished"):
        stop = "stopped early (quality dropped)" if state.get("stopped_early") else "ran every round"
        lines.append(f"- **best round: {state['best_round']}** (policy `{state['best_policy']}`); the loop {stop}")
    return lines


def _reward_source(reward: dict) -> str:
    """What scored a PPO stage's rollouts, from its summary's `reward`."""
    if reward["source"] == "model":
        return f"the reward model `{reward['reward_model']}`"
    return (f"the direct score (d-RLAIF) of judge `{reward['judge_model']}`: the expected score from 1 to 9 of its "
            f"digit probabilities, averaged over {reward['principles']} principles of constitution "
            f"`{reward['constitution']}`, {reward['offset']:+g} (no reward model)")


def _stages_that_did_not_do_their_job(state: dict) -> list[tuple[int, str]]:
    """(round, why) of every SFT that did not run (too few revisions were replies) and every reward
    model that did not pass the reward gate."""
    found = []
    for r in sorted(int(k) for k in state["rounds"] if int(k) > 0):
        sft, gate = _done(state, r, "sft") or {}, _done(state, r, "reward_gate") or {"passed": True}
        found += [(r, f"SFT did not run: {sft['skipped']}")] if "skipped" in sft else []
        found += [(r, gate["reason"])] if not gate["passed"] else []
    return found


def _win(w: dict) -> str:
    return f"{w['win_rate']:.3f} ± {_fmt(w['stderr'])} (hard {w['hard_win_share']:.0%}, n={w['n']})"


def _results(state: dict, rounds: list[int]) -> list[str]:
    base = _baseline(state)
    if base is None:
        return ["", "No evaluation yet: the starting model's outputs are not complete."]
    lines = ["", "## Results per round", "",
             "Win-rate: mean soft label P(round's model ≻ starting model) from the constitutional judge, both "
             "orders averaged, ± standard error; hard = share of prompts won outright. Over-refusal: share of "
             "benign prompts that look dangerous which the model refuses (rule-based detector, below).", "",
             "| round | harmlessness win-rate | helpfulness win-rate | over-refusal | capability (mean) | "
             "alignment tax (of the mean) | quality |", "| --- | --- | --- | --- | --- | --- | --- |",
             f"| 0 (start) | 0.5 by definition | 0.5 by definition | {_refused(base['over_refusal'])} | "
             f"{_fmt(_mean([c['score'] for c in base['capability'].values()]))} | — | — |"]
    for label, f in (row for r in rounds for row in _evaluated(state, r)):
        tax = f["alignment_tax"]
        lines.append(f"| {label} | {_win(f['harmlessness'])} | {_win(f['helpfulness'])} | {_refused(f['over_refusal'])} | "
                     f"{_fmt(tax['mean_aligned'])} | {_fmt(tax['mean_tax'], '+.1%')} | {f['quality']:.3f} |")
    return lines if rounds else lines + ["", "No round evaluated yet."]


def _refused(o: dict) -> str:
    return f"{_fmt(o['rate'], '.0%')} ({o['refused']}/{o['n']})"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _figures(drawn: dict[str, Path]) -> list[str]:
    lines = ["", "## Figures", ""]
    if not drawn:
        return lines + ["No figure yet: no training log and no evaluated round."]
    for name, path in drawn.items():
        lines += [f"![{name}](figures/{path.name})", ""]
    return lines


def _tax_table(state: dict, rounds: list[int]) -> list[str]:
    if not rounds or not _figures_of(state, rounds[0])["alignment_tax"]["benchmarks"]:
        return ["", "## Alignment tax", "", "No capability benchmark was evaluated."]
    names = list(_figures_of(state, rounds[0])["alignment_tax"]["benchmarks"])
    base = _baseline(state)["capability"]
    lines = ["", "## Alignment tax per benchmark", "",
             "Scores are accuracies (GSM8K-style: exact match of the final number; multiple choice: the option "
             "of highest log-likelihood), ± binomial standard error. Tax = (base − aligned) / base: > 0 a "
             "regression, < 0 an improvement; the mean row is the tax of the mean scores.", "",
             "| benchmark | n | start | " + " | ".join(f"round {r} | tax {r}" for r in rounds) + " |",
             "| --- | --- | --- | " + " | ".join("--- | ---" for _ in rounds) + " |"]
    for name in names:
        cells = []
        for r in rounds:
            row = _figures_of(state, r)["alignment_tax"]["benchmarks"][name]
            cells.append(f"{_scored(row['aligned'], _figures_of(state, r)['capability'][name])} | "
                         f"{_fmt(row['tax'], '+.1%', 'n/a (start 0)')} {row['change']}")
        lines.append(f"| {name} | {base[name]['n']} | {_scored(base[name]['score'], base[name])} | "
                     + " | ".join(cells) + " |")
    means = [_figures_of(state, r)["alignment_tax"] for r in rounds]
    cells = [f"{_fmt(t['mean_aligned'])} | {_fmt(t['mean_tax'], '+.1%', 'n/a (start 0)')}" for t in means]
    return lines + [f"| **mean** | | {_fmt(means[0]['mean_base'])} | " + " | ".join(cells) + " |"]


def _scored(score: float, row: dict) -> str:
    """A benchmark score with its binomial standard error, where the run recorded one."""
    return f"{score:.3f} ± {row['stderr']:.3f}" if "stderr" in row else f"{score:.3f}"


def _training(state: dict, config: dict) -> list[str]:
    lines = ["", "## Stages per round", ""]
    for r in sorted(int(k) for k in state["rounds"] if int(k) > 0):
        stages = state["rounds"][str(r)]["stages"]
        done = {name: s["summary"] for name, s in stages.items() if s.get("status") == "done"}
        parts = [_stage_line(name, summary) for name, summary in done.items()
                 if name not in ("evaluate", "evaluate_sft", "depth")]
        lines.append(f"- round {r}: " + "; ".join(p for p in parts if p))
        examples = done.get("sl_cai", {}).get("revisions", {}).get("examples", {})
        lines += [f"  - a final revision judged *{verdict}*: \"{texts[0]}…\"" for verdict, texts in examples.items()]
    return lines


def _stage_line(name: str, s: dict) -> str:
    final = s.get("final", {})
    if "skipped" in s:
        return f"**{name.upper()} did not run**: {s['skipped']}"
    if name == "sl_cai":
        line = f"SL-CAI {s['prompts']} prompts, {s['preference_pairs']} preference pairs"
        return line + (f". {revisions_line(s)}" if "revisions" in s else "")
    if name == "label":
        return f"labels {s.get('labels', 0)} pairs (mean p_chosen {_fmt(s.get('mean_p_chosen'))})"
    if name == "reward_gate":
        return f"reward gate: {'passed' if s['passed'] else '**not passed**'}, {s['reason']}"
    if name == "reward":
        return (f"reward model {s['steps']} steps, held-out accuracy {_fmt(s.get('eval_accuracy'))} "
                f"(n={s.get('eval_pairs', 0)}){_models(s)}")
    shown = ", ".join(f"{k} {_fmt(final[k], '.4g')}" for k in ("loss", "reward", "kl", "reward_margin") if k in final)
    return f"{name.upper()} {s['steps']} steps, last step: {shown}{_models(s)}"


def _models(s: dict) -> str:
    """", in policy float32 + reference bfloat16 on cpu (autocast no)" of a training summary ("" if it has none)."""
    models = s.get("models")
    if not models:
        return ""
    devices = sorted({m["device"] for m in models.values()})
    return (", in " + " + ".join(f"{role} {m['dtype']}" for role, m in models.items())
            + f" on {', '.join(devices)} (autocast {s.get('autocast', 'no')})")


def _detector() -> list[str]:
    examples = load_refusal_examples()
    lines = ["", "## Refusal detector", "",
             "Rule-based (cai_fast.evaluate.refusal.is_refusal), measured on the hand-labelled responses shipped in "
             "`cai_fast/eval_sets/refusals.jsonl` (refusal = positive). dev: written to develop the rules; test: "
             "written after them and not used to change them; model: real SmolLM2-135M-Instruct answers to the "
             "demo's evaluation prompts, used to adjust the rules; revision: the demo's SL-CAI final revisions "
             "(SmolLM2-135M as its own critic), labelled after the rules and not used to change them.", "",
             "| split | n | accuracy | precision | recall |", "| --- | --- | --- | --- | --- |"]
    for split in SPLITS:
        s = detector_scores([e for e in examples if e.get("split") == split])
        lines.append(f"| {split} | {s['n']} | {s['accuracy']:.1%} | {_fmt(s['precision'], '.1%')} | "
                     f"{_fmt(s['recall'], '.1%')} |")
    return lines


def _eval_sets(state: dict) -> list[str]:
    sets = state.get("eval_sets")
    if not sets:
        return []
    lines = ["", "## Evaluation sets", "",
             f"- prompts: {sets['harmless']} red-team (harmlessness), {sets['helpful']} helpful, "
             f"{sets['over_refusal']} benign that look dangerous (over-refusal); {state.get('train_prompts')} "
             "training prompts, none of them among these"]
    for name, b in sets["benchmarks"].items():
        lines.append(f"- benchmark `{name}` ({b['kind']}): {b['n']} of {b['of']} examples from `{b['path']}`")
    for path in sets["skipped_benchmarks"]:
        lines.append(f"- file `{path}` skipped: it does not exist (skip_missing_benchmarks = 1)")
    return lines


def _times(state: dict) -> list[str]:
    lines = ["", "## Wall time per stage", "", "| round | stage | seconds | note |", "| --- | --- | --- | --- |"]
    total = 0.0
    for r in sorted(state["rounds"], key=int):
        for name, s in state["rounds"][r]["stages"].items():
            if s.get("status") == "done":
                total += s["seconds"]
                note = "resumed after an interruption (time of the last attempt)" if s.get("resumed") else ""
                lines.append(f"| {r} | {name} | {s['seconds']} | {note} |")
            else:
                lines.append(f"| {r} | {name} | — | not complete |")
    return lines + [f"| | total | {round(total, 1)} | |"]


def _configuration(root: Path, config: dict) -> list[str]:
    lines = ["", "## Configuration", ""]
    source = root / "config.source"
    if source.is_file():
        lines += ["The config file as given:", "", "```", source.read_text(encoding="utf-8").rstrip(), "```", ""]
    return lines + ["Every field, defaults included (`config.json`):", "", "```json",
                    json.dumps(config, indent=2), "```"]
