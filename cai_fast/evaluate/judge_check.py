"""The judge checked against people: agreement and calibration on a human-labelled preference set.

    check_judge(judge, path, size, seed, out_dir)  -> figures (see human_agreement), judging resumably in out_dir
    human_agreement(records, seed)                 -> the same figures from label records

The set is a pairs file (cai_fast.labelling.pairs: hh-rlhf chosen/rejected transcripts, or trl preference JSONL)
whose `chosen` is the response people preferred; `size` pairs are sampled by seed and the judge scores each with
the people's choice as `a`. A judge at chance agrees about half the time whatever its confidence; these are the
numbers that tell a user whether to trust the labels of a given judge model.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..labelling.report import label_stats
from ..seeding import seeded_sample, stable_seed
from ..stats import mean_stderr

CALIBRATION_BINS = 5


def _agreement(probabilities: list[float]) -> dict:
    """Share of P(people's choice ≻ other) values above ½ (½ counts one half), with its stderr."""
    rate, stderr = mean_stderr([1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probabilities])
    return {"rate": rate, "stderr": stderr, "n": len(probabilities)}


def calibration(probabilities: list[float], bins: int = CALIBRATION_BINS) -> dict:
    """Reliability table and expected calibration error of P(people's choice ≻ other) values."""
    rows = [{"low": 0.5 + 0.5 * b / bins, "high": 0.5 + 0.5 * (b + 1) / bins, "n": 0, "confidence": None,
             "accuracy": None} for b in range(bins)]
    members: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for p in probabilities:
        confidence = max(p, 1 - p)
        members[min(int((confidence - 0.5) * 2 * bins), bins - 1)].append(
            (confidence, 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0))
    ece = 0.0
    for row, inside in zip(rows, members):
        if inside:
            row.update(n=len(inside), confidence=sum(c for c, _ in inside) / len(inside),
                       accuracy=sum(a for _, a in inside) / len(inside))
            ece += len(inside) / len(probabilities) * abs(row["accuracy"] - row["confidence"])
    return {"bins": rows, "ece": ece if probabilities else None}


def human_agreement(records: list[dict], seed: int) -> dict:
    """The figures from label records (cai_fast.labelling) whose `a` is the people's choice:

    agreement          share of pairs whose order-averaged soft label prefers the people's choice
                       (label > ½; a tie, label = ½, counts one half), with its standard error
    chosen_first       the same from the single order that shows the people's choice as (A)
    chosen_second      ... as (B)
    random_order       the same from one order drawn per pair by a seeded coin (trl's old judges)
    order_flip_rate    share of single-order verdicts (pair × principle) that flip when the order
                       is swapped (cai_fast.labelling.report.label_stats)
    calibration        the soft label read as a confidence: each pair's confidence max(p, 1 − p),
                       p = P(people's choice ≻ other), in CALIBRATION_BINS equal bins over [½, 1];
                       per bin n, mean confidence and accuracy (share where the judge's side is the
                       people's); `ece` = Σ_bins n_b/N · |accuracy_b − confidence_b|
    """
    first = [sum(r["p_ab_a"]) / len(r["p_ab_a"]) for r in records]
    second = [sum(r["p_ba_b"]) / len(r["p_ba_b"]) for r in records]
    coin = [stable_seed(seed, r["pair_id"], "order") % 2 == 0 for r in records]
    labels = [r["label"] for r in records]
    return {"n": len(records), "agreement": _agreement(labels), "chosen_first": _agreement(first),
            "chosen_second": _agreement(second),
            "random_order": _agreement([a if heads else b for a, b, heads in zip(first, second, coin)]),
            "order_flip_rate": label_stats(records)["order_flip_rate"] if records else None,
            "calibration": calibration(labels)}


def check_judge(judge, path: str | Path, size: int, seed: int, out_dir: str | Path, *,
                progress: bool = True) -> dict:
    """Judge `size` pairs of the human-labelled set `path` (sampled by seed, people's choice as a;
    malformed records are skipped and counted) with `judge` (a ConstitutionalJudge), resumably in
    out_dir; human_agreement of the labels, with the set's size (`of`)."""
    from ..labelling.run import run_labelling
    from ..labelling.pairs import load_pairs

    loaded = load_pairs(path, on_error="skip")  # public sets hold a few records with an empty answer
    pairs = seeded_sample(loaded.pairs, size, seed, "human_preferences")
    records = run_labelling(judge, pairs, out_dir=out_dir, progress=progress,
                            run_info={"human_preferences": str(path)}).records
    return {**human_agreement(records, seed), "path": str(path), "of": len(loaded),
            "malformed_skipped": loaded.malformed}


def check_judge_in_dtypes(judge_in, config, out_dir: str | Path, run_dtype: str, *, progress: bool = True) -> dict:
    """check_judge of `judge_in(None)` (the run's judge) against config.human_preferences, with its
    seconds; with config.human_dtypes also of `judge_in(dtype)` for each other dtype, under `by_dtype`
    (the run's own dtype is the main check, not judged again)."""
    def checked(dtype: str | None, out: Path) -> dict:
        start = time.perf_counter()
        figures = check_judge(judge_in(dtype), config.human_preferences, config.human_size, config.subset_seed, out,
                              progress=progress)
        return {**figures, "seconds": round(time.perf_counter() - start, 1)}

    out_dir = Path(out_dir)
    main = checked(None, out_dir)
    if not config.judge_dtypes:
        return main
    return {**main, "by_dtype": {d: main if d == run_dtype else checked(d, out_dir / d) for d in config.judge_dtypes}}
