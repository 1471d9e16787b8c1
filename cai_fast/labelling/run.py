"""RLAIF labelling runs: sample, pair and judge prompts, or judge given pairs; resumably.

`run_labelling(judge, prompts_or_pairs, config, out_dir=...)`. Prompts: N responses each (temperature, seeded),
then all pairs among them or `pairs_per_prompt` of them (seeded); pairs with an empty response or two identical
ones are left out and counted. Pairs (`load_pairs`: trl preference JSONL, plain or conversational, SL-CAI's
preference output, hh-rlhf transcripts) are judged as given. Samples (keyed by prompt id) and labels (keyed by
pair id) are appended to the run folder atomically (cai_fast.store), so a killed run resumes without regenerating
or relabelling anything, and a different config on the same folder is refused. Run folder: `samples-*.jsonl`,
`labels-*.jsonl`, `preference/train-00000.jsonl` (trl's format: `preference_row`), `report.md`, `label_confidence.png`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from ..data import Prompt
from ..engine.base import SamplingParams, engine_record
from ..engine.chat_api import api_usage
from .judge import ConstitutionalJudge, JudgeStats
from .config import LabelConfig
from .report import label_stats, write_report
from .pairs import Pair, pairs_from_samples
from ..responses import sample_responses
from ..store import RunStore, resume_batches, write_jsonl

SAMPLES, LABELS = "samples", "labels"
CHAT_API_COUNTS = ("options_outside_top_k", "prompts_outside_top_k", "verdicts_parsed", "verdicts_missing")


@dataclass
class LabelResult:
    records: list[dict]
    preference: object  # datasets.Dataset in trl's preference format
    summary: dict
    report: Path | None = None


def run_labelling(judge: ConstitutionalJudge, source: Sequence[Prompt] | Sequence[Pair],
                  config: LabelConfig = LabelConfig(), *, policy=None, out_dir: str | Path | None = None,
                  run_info: dict | None = None, progress: bool = True) -> LabelResult:
    """Label prompts (sample with `policy`, a generator — default: the judge's own —, pair, judge)
    or pairs (judge); with `out_dir`, resumably."""
    start, items, usage_before = time.perf_counter(), list(source), replace(judge.generator.stats)
    if not items:
        raise ValueError("run_labelling: nothing to label (no prompts or pairs given)")
    from_prompts = isinstance(items[0], Prompt)
    store = None if out_dir is None else RunStore(out_dir, _run_config(judge, config, items, from_prompts,
                                                                       run_info))
    summary = {}
    try:
        if from_prompts:
            samples, summary = _sample_all(policy or judge.generator, items, config, judge.config, store, progress)
            pairs, left_out = pairs_from_samples(samples, config.pairs_per_prompt, judge.config.seed)
            summary.update(left_out)
        else:
            pairs = items
        records, judging = _label_all(judge, pairs, store, progress)
    finally:  # a failed or interrupted run's API usage is recorded too
        usage = api_usage([(judge.generator, usage_before)], store)
    summary.update(judging, seconds=round(time.perf_counter() - start, 1), **usage)
    return _finish(judge, records, summary, store)


def _run_config(judge: ConstitutionalJudge, config: LabelConfig, items: list, from_prompts: bool,
                run_info: dict | None) -> dict:
    ids = hashlib.sha256("".join(x.id for x in items).encode()).hexdigest()
    sampling = asdict(config) if from_prompts else {}
    return {**sampling, **asdict(judge.config), **(run_info or {}), "stage": "label",
            "input": "prompts" if from_prompts else "pairs", "inputs_sha256": ids, "num_inputs": len(items),
            "constitution": judge.constitution.name, "constitution_sha256": judge.constitution.fingerprint(),
            "options": judge.options.describe()}


def _sample_all(generator, prompts: list[Prompt], config: LabelConfig, judge_config, store: RunStore | None,
                progress: bool) -> tuple[list[dict], dict]:
    """N sampled responses per prompt (cai_fast.responses), and how sampling went."""
    tokens_before, start = generator.stats.generated_tokens, time.perf_counter()
    params = SamplingParams(config.sample_tokens, config.temperature, config.top_p, judge_config.seed)
    samples, resumed = sample_responses(generator, prompts, params, config.samples, store=store, kind=SAMPLES,
                                        batch_size=judge_config.batch_size, progress=progress)
    stats = {"prompts": len(prompts), "prompts_sampled_now": len(prompts) - resumed,
             "sample_tokens": generator.stats.generated_tokens - tokens_before,
             "sampling_seconds": round(time.perf_counter() - start, 2)}
    return samples, stats


def _label_all(judge: ConstitutionalJudge, pairs: Sequence[Pair], store: RunStore | None,
               progress: bool) -> tuple[list[dict], dict]:
    """Label records of every pair; the ones stored by an earlier run are read, not redone."""
    def work(batch: list[Pair]) -> list[dict]:
        result = judge.score([p.prompt for p in batch], [p.a for p in batch], [p.b for p in batch])
        return [_label_record(p, result.record(k)) for k, p in enumerate(batch)]

    before = replace(judge.stats)
    chunk = max(1, math.ceil(judge.config.batch_size / (2 * judge.principles_per_pair)))
    records, resumed = resume_batches(store, LABELS, pairs, work, batch_size=chunk, key="pair_id",
                                      desc="judging", unit="pair", progress=progress)
    return records, _judging_stats(judge.stats, before, resumed)


def _label_record(pair: Pair, labels: dict) -> dict:
    return {"pair_id": pair.id, "prompt_id": pair.prompt_id, "a_id": pair.a_id, "b_id": pair.b_id,
            "source": pair.source, "prompt": pair.prompt, "a": pair.a, "b": pair.b, "meta": pair.meta,
            **labels}


def _judging_stats(now: JudgeStats, before: JudgeStats, resumed: int) -> dict:
    pairs, seconds = now.pairs - before.pairs, now.seconds - before.seconds
    prompts, tokens = now.judge_prompts - before.judge_prompts, now.prompt_tokens - before.prompt_tokens
    rate = (lambda n, digits: round(n / seconds, digits)) if seconds > 0 else (lambda n, digits: 0.0)
    return {"labels_from_earlier_run": resumed, "labelled_now": pairs, "judge_prompts": prompts,
            "judge_prompt_tokens": tokens, "rationale_tokens": now.rationale_tokens - before.rationale_tokens,
            "judge_seconds": round(seconds, 2), "labels_per_s": rate(pairs, 3),
            "judge_prompts_per_s": rate(prompts, 2), "judge_tokens_per_s": rate(tokens, 1),
            **{name: getattr(now, name) - getattr(before, name) for name in CHAT_API_COUNTS}}


def margin_of(p_chosen: float) -> float:
    """The `margin` of a preference row: 2·p − 1, from 0 (a tie) to 1 (certain). trl's
    RewardTrainer minimises −log σ(r_chosen − r_rejected − margin): a margin of this size, Llama 2's
    scale, asks a confident label for a reward gap about 1 nat wider than a tie's, where logit(p)
    (up to 13.8) asked for 13.8 nats and started the loss at 13.8."""
    return 2 * p_chosen - 1


def preference_row(record: dict) -> dict:
    """The trl preference row of a label record: chosen is the side the soft label prefers.

    Fields: prompt, chosen, rejected, p_chosen, margin (= 2·p_chosen − 1 in [0, 1], which trl's
    RewardTrainer reads), principle_ids, p_chosen_by_principle, p_chosen_as_a / p_chosen_as_b (per
    principle, with chosen shown as (A) / as (B)), pair_id, prompt_id, chosen_id, rejected_id.
    """
    a_wins = record["label"] >= 0.5
    flip = (lambda xs: xs) if a_wins else (lambda xs: [1 - x for x in xs])
    p = record["label"] if a_wins else 1 - record["label"]
    chosen, rejected = (record["a"], record["b"]) if a_wins else (record["b"], record["a"])
    ids = (record["a_id"], record["b_id"]) if a_wins else (record["b_id"], record["a_id"])
    as_a, as_b = (record["p_ab_a"], record["p_ba_b"]) if a_wins else (flip(record["p_ba_b"]), flip(record["p_ab_a"]))
    row = {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected, "p_chosen": p,
           "margin": margin_of(p), "principle_ids": record["principle_ids"],
           "p_chosen_by_principle": flip(record["principle_label"]), "p_chosen_as_a": as_a,
           "p_chosen_as_b": as_b, "pair_id": record["pair_id"], "prompt_id": record["prompt_id"],
           "chosen_id": ids[0], "rejected_id": ids[1]}
    if record["a_id"] == "input-chosen":
        row["agrees_with_input"] = a_wins
    for key, value in record["meta"].items():
        row[key if key not in row else f"input_{key}"] = value
    return row


def _finish(judge: ConstitutionalJudge, records: list[dict], summary: dict, store: RunStore | None) -> LabelResult:
    from datasets import Dataset

    rows = [preference_row(r) for r in records]
    summary.update(labels=len(records), principles_per_pair=judge.principles_per_pair,
                   aggregate=judge.config.aggregate, chain_of_thought=judge.config.chain_of_thought,
                   defend=judge.config.defend, options=judge.options.describe(),
                   constitution=judge.constitution.name, engine=engine_record(judge.generator),
                   **label_stats(records))
    report = None
    if store:
        path = store.root / "preference" / "train-00000.jsonl"
        write_jsonl(path, rows)
        summary["files"] = {"preference": str(path)}
        report = write_report(store.root, summary, [r["p_chosen"] for r in rows])
        summary["files"]["report"] = str(report)
    return LabelResult(records, Dataset.from_list(rows), summary, report)
