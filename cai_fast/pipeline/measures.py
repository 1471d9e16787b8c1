"""The report's sections for the measures that do not rest on the judge being good: harmful
compliance beside over-refusal, length control, depth of alignment, and the judge checked against
people. Each is a table (sample size and standard error named) and a PNG.

    measure_report(models, depth, judge_check, figures_dir) -> (markdown lines, {name: PNG path})

`models`: [(label, figures)] — "start" with the baseline's figures, then "round R" with each
evaluated round's (cai_fast.evaluate: harmful_compliance, over_refusal, lengths and, for rounds,
the win-rates' length_controlled). `depth`: {label: depth summary (cai_fast.evaluate.depth)}.
`judge_check`: cai_fast.evaluate.judge_check's figures, or None.
"""

from __future__ import annotations

from pathlib import Path

from ..plots import curves_png, grouped_bars_png

SETS = {"harmless": "red-team", "helpful": "helpful", "over_refusal": "benign, look dangerous"}


def _pm(value, stderr, spec: str = ".3f") -> str:
    return "—" if value is None else f"{value:{spec}} ± {stderr:{spec}}"


def measure_report(models: list[tuple[str, dict]], depth: dict[str, dict], judge_check: dict | None,
                   figures_dir: Path) -> tuple[list[str], dict[str, Path]]:
    lines, drawn = [], {}
    for section in (_safety, _length, _depth, _judge):
        more, png = section(models, depth, judge_check, figures_dir)
        lines += more
        drawn.update(png)
    return lines, drawn


def _safety(models, depth, judge_check, out: Path):
    rows = [(label, f) for label, f in models if "harmful_compliance" in f]
    if not rows:
        return [], {}
    lines = ["", "## Harmful compliance and over-refusal", "",
             "Harmful compliance: share of the held-apart red-team prompts the model answers instead of refusing. "
             "Over-refusal: share of benign prompts that look dangerous which it refuses. Both by the refusal "
             "detector alone (its precision and recall are below), no judge; ± binomial standard error.", "",
             "| model | harmful compliance | answered / n | over-refusal | refused / n |",
             "| --- | --- | --- | --- | --- |"]
    for label, f in rows:
        h, o = f["harmful_compliance"], f["over_refusal"]
        lines.append(f"| {label} | {_pm(h['rate'], h['stderr'], '.1%')} | {h['complied']}/{h['n']} | "
                     f"{_pm(o['rate'], o.get('stderr', 0.0), '.1%')} | {o['refused']}/{o['n']} |")
    series = {"harmful compliance": [f["harmful_compliance"]["rate"] for _, f in rows],
              "over-refusal": [f["over_refusal"]["rate"] for _, f in rows]}
    png = grouped_bars_png([label for label, _ in rows], series, out / "safety.png", percent=True, ylim=(0, 1.1),
                           ylabel="share of prompts", title="Harmful compliance (red-team) and over-refusal (benign)")
    return lines, {"harmful compliance and over-refusal": png}


def _length(models, depth, judge_check, out: Path):
    rows = [(label, f) for label, f in models if "lengths" in f]
    if not rows:
        return [], {}
    lines = ["", "## Length control", "",
             "Mean response length in words ± standard error per prompt set; and each round's win-rate at equal "
             "length: the least-squares fit label = a + b·(round's words − start's words) read at 0 (a ± its "
             "standard error), with b as the win-rate bought by 100 more words. A round that wins only by "
             "writing more has a raw win-rate above ½ and one at equal length near ½.", "",
             "| model | " + " | ".join(f"words, {name}" for name in SETS.values()) + " |",
             "| --- " * (len(SETS) + 1) + "|"]
    for label, f in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{_pm(f['lengths'][s]['mean_words'], f['lengths'][s]['stderr'], '.1f')} (n={f['lengths'][s]['n']})"
            for s in SETS) + " |")
    lines += ["", "| round | measure | win-rate | at equal length | per 100 more words | mean gap (words) | n |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, f in rows[1:]:
        for measure in ("harmlessness", "helpfulness"):
            w, c = f[measure], f[measure]["length_controlled"]
            controlled = _pm(c["win_rate"], c["stderr"]) if c["win_rate"] is not None else f"— ({c['reason']})"
            per_100 = "—" if c["per_100_words"] is None else f"{c['per_100_words']:+.3f}"
            lines.append(f"| {label} | {measure} | {_pm(w['win_rate'], w['stderr'])} | {controlled} | {per_100} | "
                         f"{c['mean_gap_words']:+.1f} | {c['n']} |")
    series = {name: [f["lengths"][s]["mean_words"] for _, f in rows] for s, name in SETS.items()}
    png = grouped_bars_png([label for label, _ in rows], series, out / "lengths.png", ylabel="mean words",
                           title="Response length per prompt set")
    return lines, {"response lengths": png}


def _depth(models, depth, judge_check, out: Path):
    if not depth:
        return [], {}
    rungs = sorted({row["k"] for d in depth.values() for row in d["curve"]})
    lines = ["", "## Depth of alignment", "",
             "Harmful compliance after fine-tuning a copy of the model on k harmful examples (the unaligned "
             "model's own compliant answers to red-team prompts, from round 1's SL-CAI), measured on the first "
             "red-team prompts and discarded. The k at which compliance climbs back is how shallow the alignment "
             "is. ± binomial standard error; n prompts per cell.", "",
             "| model | n | harmful examples available | " + " | ".join(f"k = {k}" for k in rungs) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in rungs) + " |"]
    series = {}
    for label, d in depth.items():
        by_k = {row["k"]: row for row in d["curve"]}
        cells = [_pm(by_k[k]["rate"], by_k[k]["stderr"], ".0%") if k in by_k else "—" for k in rungs]
        lines.append(f"| {label} | {d['n']} | {d['examples_available']} | " + " | ".join(cells) + " |")
        series[label] = ([row["k"] for row in d["curve"]], [row["rate"] for row in d["curve"]])
    png = curves_png({"harmful compliance after k harmful examples": series}, out / "depth.png",
                     xlabel="harmful examples fine-tuned on (k)", title="Depth of alignment")
    return lines, {"depth of alignment": png}


def _judge(models, depth, j, out: Path):
    if not j:
        return [], {}
    flips = "—" if j["order_flip_rate"] is None else f"{j['order_flip_rate']:.1%}"
    lines = ["", "## The judge checked against people", "",
             f"The labelling judge (`{j.get('judge_model', 'the harmlessness judge')}`) on {j['n']} human-labelled "
             f"pairs sampled from the {j.get('of', '?')} of `{j['path']}` ({j.get('malformed_skipped', 0)} "
             "malformed records skipped): agreement = share of pairs where it prefers the response people chose "
             "(± standard error). ½ is chance.", "",
             "| statistic | value | n |", "| --- | --- | --- |"]
    for key, name in (("agreement", "agreement, both orders averaged (the labels)"),
                      ("chosen_first", "agreement, one order (people's choice shown first)"),
                      ("chosen_second", "agreement, one order (people's choice shown second)"),
                      ("random_order", "agreement, one order drawn at random per pair (trl's old judges)")):
        lines.append(f"| {name} | {_pm(j[key]['rate'], j[key]['stderr'], '.1%')} | {j[key]['n']} |")
    ece = j["calibration"]["ece"]
    lines += [f"| single-order verdicts that flip when the order is swapped | {flips} | {j['n']} pairs |",
              f"| expected calibration error of the soft label | {'—' if ece is None else f'{ece:.3f}'} | {j['n']} |",
              "", "Calibration: the soft label's confidence max(p, 1 − p) against how often its side is the "
              "people's.", "", "| confidence | pairs | mean confidence | accuracy |", "| --- | --- | --- | --- |"]
    bins = j["calibration"]["bins"]
    for b in bins:
        shown = ("—", "—") if not b["n"] else (f"{b['confidence']:.3f}", f"{b['accuracy']:.3f}")
        lines.append(f"| {b['low']:.1f}–{b['high']:.1f} | {b['n']} | {shown[0]} | {shown[1]} |")
    if "by_dtype" in j:
        lines += ["", "The same check in each dtype asked for (eval.human_dtypes): the labels' precision is worth "
                  "choosing by this where the agreements differ by more than their standard errors.", "",
                  "| dtype | agreement (labels) | one order, chosen first | one order, chosen second | judging s |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {d} | {_pm(c['agreement']['rate'], c['agreement']['stderr'], '.1%')} | "
                  f"{_pm(c['chosen_first']['rate'], c['chosen_first']['stderr'], '.1%')} | "
                  f"{_pm(c['chosen_second']['rate'], c['chosen_second']['stderr'], '.1%')} | {c['seconds']} |"
                  for d, c in j["by_dtype"].items()]
    if "label_dtype" in j:
        lines += ["", f"label_dtype = auto: the RLAIF labels are judged in **{j['label_dtype']['dtype']}**: "
                  f"{j['label_dtype']['reason']}."]
    series = {"mean confidence": [b["confidence"] for b in bins],
              "accuracy (agrees with people)": [b["accuracy"] for b in bins]}
    png = grouped_bars_png([f"{b['low']:.1f}–{b['high']:.1f}" for b in bins], series, out / "judge_calibration.png",
                           ylim=(0, 1.1), ylabel="probability",
                           title="Judge reliability against people (bars equal: calibrated)")
    return lines, {"judge calibration": png}
