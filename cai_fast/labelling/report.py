"""The labelling run's report: position bias before averaging, label confidence, per-principle
agreement, time — `report.md` and `label_confidence.png` in the run folder (the pipeline's report
is cai_fast.pipeline.report)."""

from __future__ import annotations

from pathlib import Path

from ..store import write_atomic

CONFIDENCE_BINS = 10


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def label_stats(records: list[dict]) -> dict:
    """Position bias before averaging, label confidence and per-principle agreement of records."""
    if not records:
        return {}
    orders = [(ab, ba) for r in records for ab, ba in zip(r["p_ab_a"], r["p_ba_b"])]
    confidence = [max(r["label"], 1 - r["label"]) for r in records]
    histogram = [0] * CONFIDENCE_BINS
    for c in confidence:
        histogram[min(int((c - 0.5) * 2 * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)] += 1
    given = [r["label"] >= 0.5 for r in records if r["a_id"] == "input-chosen"]
    return {
        **({"agreement_with_input": _mean(given)} if given else {}),
        "order_flip_rate": _mean((ab > 0.5) != (ba > 0.5) for ab, ba in orders),
        "position_a_win_rate": _mean([ab > 0.5 for ab, _ in orders] + [ba < 0.5 for _, ba in orders]),
        "mean_p_position_a": _mean([ab for ab, _ in orders] + [1 - ba for _, ba in orders]),
        **({"mean_option_mass": _mean(m for r in records for pair in r["option_mass"] for m in pair)}
           if all("option_mass" in r for r in records) else {}),
        "mean_p_chosen": _mean(confidence),
        "confidence_histogram": histogram,
        "per_principle": per_principle_agreement(records),
    }


def per_principle_agreement(records: list[dict]) -> dict[str, dict]:
    """Per principle id: judgements, share agreeing with the pair's averaged label, order-flip rate."""
    table: dict[str, list] = {}
    for r in records:
        for pid, label, ab, ba in zip(r["principle_ids"], r["principle_label"], r["p_ab_a"], r["p_ba_b"]):
            table.setdefault(pid, []).append(((label > 0.5) == (r["label"] > 0.5), (ab > 0.5) != (ba > 0.5)))
    return {pid: {"n": len(rows), "agreement": sum(a for a, _ in rows) / len(rows),
                  "flip_rate": sum(f for _, f in rows) / len(rows)} for pid, rows in sorted(table.items())}


def summary_lines(s: dict) -> list[str]:
    """The headline of a labelling run, for the terminal and the top of the report."""
    lines = [f"{s['labels']} labels ({s.get('labels_from_earlier_run', 0)} from an earlier run), "
             f"{s['principles_per_pair']} principle(s) per pair, both orders, aggregate {s['aggregate']}"]
    if "prompts" in s:
        lines.append(f"{s['prompts']} prompts sampled ({s['prompts_sampled_now']} now, {s['sample_tokens']} "
                     f"tokens in {s['sampling_seconds']} s); pairs left out: {s['left_out_identical']} "
                     f"identical, {s['left_out_empty']} with an empty response")
    if s["labels"]:
        lines.append(f"position bias before averaging: single-order verdict flips on swap "
                     f"{s['order_flip_rate']:.1%}, first position wins {s['position_a_win_rate']:.1%}; "
                     f"mean p_chosen {s['mean_p_chosen']:.3f}")
    if "agreement_with_input" in s:
        lines.append(f"the judge keeps the input file's chosen response in {s['agreement_with_input']:.1%} of pairs")
    lines.append(f"judging: {s['labelled_now']} pairs, {s['judge_prompts']} judge prompts "
                 f"({s['judge_prompt_tokens']} tokens) in {s['judge_seconds']} s: {s['labels_per_s']} "
                 f"labels/s, {s['judge_tokens_per_s']} prompt tokens/s; total {s['seconds']} s")
    return lines + chat_api_lines(s)


def chat_api_lines(s: dict) -> list[str]:
    """What a chat API's labels approximate and what the run cost ([] for the other engines)."""
    if "api_usage" not in s:
        return []
    u, lines = s["api_usage"], []
    if s.get("verdicts_parsed", 0) + s.get("verdicts_missing", 0):
        lines.append(f"chat API without log-probs (or chain of thought): verdicts parsed from reasoned answers, each "
                     f"a hard 1/0 clamped to 0.6/0.4 per order ({s['verdicts_parsed']} read, "
                     f"{s['verdicts_missing']} answers without a verdict scored 0.5)")
    if s["judge_prompts"] > s.get("verdicts_parsed", 0) + s.get("verdicts_missing", 0):
        lines.append(f"chat API log-probs: first answer token's top_logprobs; an option outside them gets the "
                     f"k-th log-prob (an upper bound on its probability): {s['options_outside_top_k']} options of "
                     f"{2 * s['judge_prompts']} ({s['prompts_outside_top_k']} prompts with neither, scored 0.5)")
    lines.append(f"API usage: {usage_text(u)}; over every invocation of this run: "
                 f"{usage_text(s['api_usage_all_runs'])}")
    return lines


def usage_text(u: dict) -> str:
    return (f"{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens in {u['requests']} requests "
            f"({u['retries']} retries)")


def write_report(root: Path, summary: dict, confidences: list[float]) -> Path:
    """report.md and label_confidence.png (of the p_chosen values) in the run folder; returns the
    report's path."""
    from ..plots import histogram_png

    if confidences:
        histogram_png(confidences, root / "label_confidence.png", bins=CONFIDENCE_BINS,
                      value_range=(0.5, 1.0), title="RLAIF label confidence",
                      xlabel="p_chosen (soft label of the preferred response)", ylabel="pairs")
    path = root / "report.md"
    write_atomic(path, "\n".join(_report_markdown(summary)) + "\n")
    return path


def _report_markdown(s: dict) -> list[str]:
    lines = ["# RLAIF labelling report", "", *[f"- {line}" for line in summary_lines(s)],
             f"- constitution `{s['constitution']}`; chain of thought {'on' if s['chain_of_thought'] else 'off'}; "
             f"injection defence {'on' if s['defend'] else 'off'}", f"- option tokens: {s['options']}"]
    if not s["labels"]:
        return lines
    lines += ["", "## Position bias before averaging", "", "| statistic | value |", "| --- | --- |",
              f"| single-order verdict flips when the order is swapped | {s['order_flip_rate']:.1%} |",
              f"| first position (A) wins a single-order verdict | {s['position_a_win_rate']:.1%} |",
              f"| mean P(A) over both orders | {s['mean_p_position_a']:.3f} |",
              *([f"| mean probability on the two option tokens | {s['mean_option_mass']:.3f} |"]
                if "mean_option_mass" in s else []),
              "", "Both orders are averaged in every label, so this bias does not reach the labels.",
              "", "## Label confidence", "", "![label confidence](label_confidence.png)", "",
              "| p_chosen | pairs |", "| --- | --- |"]
    width = 0.5 / CONFIDENCE_BINS
    lines += [f"| {0.5 + i * width:.2f}–{0.5 + (i + 1) * width:.2f} | {n} |"
              for i, n in enumerate(s["confidence_histogram"])]
    lines += ["", "## Per-principle agreement", "",
              "| principle | judgements | agrees with the averaged label | single-order flip rate |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {pid} | {row['n']} | {row['agreement']:.1%} | {row['flip_rate']:.1%} |"
              for pid, row in s["per_principle"].items()]
    lines += ["", "## Time", "", f"- judging: {s['judge_seconds']} s for {s['labelled_now']} pairs, "
              f"{s['labels_per_s']} labels/s, {s['judge_prompts_per_s']} judge prompts/s, "
              f"{s['judge_tokens_per_s']} prompt tokens/s"]
    if "sampling_seconds" in s:
        lines.append(f"- sampling: {s['sampling_seconds']} s, {s['sample_tokens']} tokens")
    lines.append(f"- total: {s['seconds']} s")
    return lines
