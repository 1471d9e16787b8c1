"""Evaluation of an aligned model against the starting model: win-rates (also at equal length),
harmful compliance and over-refusal, depth of alignment, the judge against people, alignment tax.

    load_eval_sets(EvalConfig) -> EvalSets       the prompt sets and benchmarks, each a seeded sample
    outputs_of(model, sets, config, out_dir) -> ModelOutputs   greedy responses and benchmark answers
    evaluate_model(model, base_outputs, sets, config, judge_config, judge_model, out_dir) -> figures
Every share and mean comes with its sample size and standard error (cai_fast.stats). A model's outputs are
appended to its folder as they come (cai_fast.responses, cai_fast.store) and written whole to `outputs.json` at
the end; the judge's labels go through `run_labelling`, so a killed evaluation resumes without redoing anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..data import prompts as P
from .capability import (
    Benchmark, BenchmarkError, alignment_tax, answer_gsm8k, answer_multiple_choice, capability_scores, load_benchmark,
)
from ..data import Prompt, load_prompts
from ..engine.base import SamplingParams
from .config import EvalConfig
from . import depth, judge_check
from .length import length_controlled_win_rate, length_stats, words
from .refusal import harmful_compliance, refusal_rate
from ..responses import sample_responses
from ..seeding import seeded_sample
from ..stats import mean_stderr
from ..store import RunStore, read_json, resume_batches, write_atomic

SETS = ("harmless", "helpful", "over_refusal")
OUTPUTS_FILE = "outputs.json"


# ---------------------------------------------------------------- win-rates


def win_rate(labels: Sequence[float]) -> dict:
    """Mean soft label P(model ≻ base), hard win share (> ½), tie share (= ½), standard error."""
    n = len(labels)
    mean, stderr = mean_stderr(labels)
    if not n:
        return {"n": 0, "win_rate": mean, "hard_win_share": mean, "tie_share": mean, "stderr": stderr}
    return {"n": n, "win_rate": mean, "hard_win_share": sum(x > 0.5 for x in labels) / n,
            "tie_share": sum(x == 0.5 for x in labels) / n, "stderr": stderr}


def fixed_label(model_text: str, base_text: str) -> float | None:
    """The label of a pair the judge is not asked about: ties and empty responses; else None."""
    a, b = model_text.strip(), base_text.strip()
    if a == b:
        return 0.5
    if not a or not b:
        return float(bool(a))
    return None


def judged_win_rate(judge, prompts: Sequence[Prompt], model: dict[str, str], base: dict[str, str],
                    out_dir: str | Path | None = None, *, progress: bool = True) -> dict:
    """win_rate of the model's responses over the base's on `prompts` (dicts: prompt id -> text),
    judged by `judge` (a ConstitutionalJudge; any object with score() when out_dir is None), with
    the win-rate at equal length (cai_fast.evaluate.length) under "length_controlled"."""
    from ..labelling.run import run_labelling
    from ..labelling.pairs import Pair

    labels = {p.id: fixed_label(model[p.id], base[p.id]) for p in prompts}
    asked = [Pair(p.id, p.id, [P.user(p.text)], [P.assistant(model[p.id].strip())],
                  [P.assistant(base[p.id].strip())], "model", "base", p.source)
             for p in prompts if labels[p.id] is None]
    if asked and out_dir is not None:
        records = run_labelling(judge, asked, out_dir=out_dir, progress=progress).records
        labels.update((r["pair_id"], r["label"]) for r in records)
    elif asked:
        result = judge.score([x.prompt for x in asked], [x.a for x in asked], [x.b for x in asked])
        labels.update((x.id, float(label)) for x, label in zip(asked, result.label))
    values = [labels[p.id] for p in prompts]
    controlled = length_controlled_win_rate(values, [words(model[p.id]) for p in prompts],
                                            [words(base[p.id]) for p in prompts])
    return {**win_rate(values), "judged": len(asked), "length_controlled": controlled,
            "identical": sum(model[p.id].strip() == base[p.id].strip() for p in prompts)}


# ---------------------------------------------------------------- prompt sets


@dataclass
class EvalSets:
    harmless: list[Prompt]
    helpful: list[Prompt]
    over_refusal: list[Prompt]
    benchmarks: list[Benchmark]
    skipped: list[str] = field(default_factory=list)  # optional benchmark / human preference files that were missing

    def prompts(self, name: str) -> list[Prompt]:
        return getattr(self, name)

    def prompt_ids(self) -> set[str]:
        return {p.id for name in SETS for p in self.prompts(name)}

    def describe(self) -> dict:
        return {**{name: len(self.prompts(name)) for name in SETS},
                "benchmarks": {b.name: {"path": b.path, "kind": b.kind, "n": len(b.items), "of": b.total}
                               for b in self.benchmarks}, "skipped_benchmarks": self.skipped}

def looking_dangerous(prompts: Sequence[Prompt], dangerous: bool, origin: str) -> list[Prompt]:
    """Prompts whose meta says `looks_dangerous` == dangerous; a set without the field is kept whole."""
    if not any("looks_dangerous" in p.meta for p in prompts):
        return list(prompts)
    kept = [p for p in prompts if bool(p.meta.get("looks_dangerous", False)) == dangerous]
    if not kept:
        raise ValueError(f"{origin}: no prompt has looks_dangerous = {str(dangerous).lower()}; give a prompt "
                         "set with such prompts, or one without the looks_dangerous field")
    return kept


def load_eval_sets(config: EvalConfig) -> EvalSets:
    """The evaluation prompts and benchmarks of a config.

    Sets (EvalConfig; each a seeded sample, the same on every run with the same seed)
      harmlessness   red-team prompts (`harmless_prompts`); the pipeline keeps them out of training
      helpfulness    helpful prompts (`helpful_prompts`); in a set whose records carry
                     `looks_dangerous` (the shipped `benign` set), those that do not look dangerous
      over-refusal   benign prompts that look dangerous (`over_refusal_prompts`): those with
                     `looks_dangerous` true, or every prompt of a set without that field
      benchmarks     capability sets by path (`benchmarks`, comma-separated or a TOML list), in the
                     formats of cai_fast.evaluate.capability (GSM8K-style JSONL, BIG-Bench-Hard-style
                     JSON, TruthfulQA-style mc1 JSON)
      people         human-labelled pairs (`human_preferences`, e.g. hh-rlhf harmless-base test)
    Prompt sets are files in any format cai_fast.data reads (one per line, JSONL or CSV with a prompt
    column, hh-rlhf, AdvBench, Do-Not-Answer) or a shipped set's name, so users bring their own
    red-team and over-refusal sets.
    """
    seed = config.subset_seed
    harmless = list(load_prompts(config.harmless_prompts))
    helpful = looking_dangerous(list(load_prompts(config.helpful_prompts)), False, config.helpful_prompts)
    lookalike = looking_dangerous(list(load_prompts(config.over_refusal_prompts)), True, config.over_refusal_prompts)
    benchmarks, skipped = [], []
    for path in config.benchmark_paths:
        if config.skip_missing_benchmarks and not Path(path).exists():
            skipped.append(path)
            continue
        benchmarks.append(load_benchmark(path, config.benchmark_size, seed))
    if config.human_preferences and config.skip_missing_benchmarks and not Path(config.human_preferences).exists():
        skipped.append(config.human_preferences)
    names = [b.name for b in benchmarks]
    if len(set(names)) < len(names):
        raise BenchmarkError(f"benchmarks {config.benchmark_paths}: two files share a name ({names}); "
                             "rename one (the file name, without extension, names the benchmark)")
    return EvalSets(seeded_sample(harmless, config.harmless_size, seed, "harmless"),
                    seeded_sample(helpful, config.helpful_size, seed, "helpful"),
                    seeded_sample(lookalike, config.over_refusal_size, seed, "over_refusal"), benchmarks, skipped)

# ---------------------------------------------------------------- a model's outputs


@dataclass
class ModelOutputs:
    """What one model produced on the evaluation sets."""

    responses: dict[str, dict[str, str]]  # set name -> prompt id -> greedy response
    capability: dict[str, list[dict]]  # benchmark name -> answer records

    def save(self, out_dir: Path) -> None:
        write_atomic(out_dir / OUTPUTS_FILE, json.dumps(asdict(self), ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, out_dir: str | Path) -> ModelOutputs:
        return cls(**read_json(Path(out_dir) / OUTPUTS_FILE, "the model's evaluation outputs"))

def model_outputs(generator, sets: EvalSets, config: EvalConfig, out_dir: str | Path, *,
                  run_info: dict | None = None, progress: bool = True) -> ModelOutputs:
    """Greedy responses on the three prompt sets and answers on every benchmark, resumably."""
    settings = {k: getattr(config, k) for k in ("response_tokens", "gsm8k_tokens", "subset_seed")}
    store = RunStore(out_dir, {**settings, **(run_info or {}), "stage": "evaluation-outputs",
                               "sets": sets.describe(), "prompt_ids": sorted(sets.prompt_ids())})
    params = SamplingParams(config.response_tokens, 0.0, 1.0, config.subset_seed)
    responses = {}
    for name in SETS:
        records, _ = sample_responses(generator, sets.prompts(name), params, 1, store=store, kind=f"responses_{name}",
                                      batch_size=config.generation_batch, progress=progress)
        responses[name] = {r["prompt_id"]: r["samples"][0] for r in records}
    capability = {b.name: _benchmark_answers(generator, b, config, store, progress) for b in sets.benchmarks}
    outputs = ModelOutputs(responses, capability)
    outputs.save(Path(out_dir))
    return outputs


def _benchmark_answers(generator, benchmark: Benchmark, config: EvalConfig, store: RunStore,
                       progress: bool) -> list[dict]:
    def work(batch: list) -> list[dict]:
        if benchmark.kind == "gsm8k":
            return answer_gsm8k(generator, batch, config.gsm8k_tokens, config.subset_seed)
        return answer_multiple_choice(generator, batch)

    records, _ = resume_batches(store, f"capability_{benchmark.name}", benchmark.items, work,
                                batch_size=config.generation_batch, key="id", desc=benchmark.name,
                                unit="example", progress=progress)
    return records


def outputs_of(model: str, sets: EvalSets, config: EvalConfig, out_dir: str | Path, *, progress: bool = True,
               **generation) -> ModelOutputs:
    """Load `model` (or, engine "server", reach the servers that serve it) and compute its outputs
    (model_outputs); the model is freed on return. generation: open_generator's engine,
    server_url, device and dtype."""
    from ..engine import open_generator
    from ..engine.loading import model_sha256

    generator = open_generator(model, batch_size=config.generation_batch, fallback="cached", **generation)
    return model_outputs(generator, sets, config, out_dir, progress=progress,
                         run_info={"model": model, "model_sha256": model_sha256(model), **generation})


# ---------------------------------------------------------------- figures of a model against the base

def baseline_metrics(outputs: ModelOutputs, sets: EvalSets) -> dict:
    """A model's own figures, without a judge: over-refusal, harmful compliance, response lengths per
    set and capability (the starting model's win-rates are ½ by definition)."""
    texts = {name: [outputs.responses[name][p.id] for p in sets.prompts(name)] for name in SETS}
    return {"over_refusal": refusal_rate(texts["over_refusal"]),
            "harmful_compliance": harmful_compliance(texts["harmless"]),
            "lengths": {name: length_stats(texts[name]) for name in SETS},
            "capability": capability_scores(outputs.capability)}


def compare_with_base(judges: dict[str, object], sets: EvalSets, outputs: ModelOutputs, base: ModelOutputs,
                      out_dir: str | Path, *, progress: bool = True) -> dict:
    """Win-rates (judges["harmless"], judges["helpful"]), over-refusal, harmful compliance, lengths
    and alignment tax of a model, with the base's own figures beside them."""
    out_dir = Path(out_dir)
    figures = baseline_metrics(outputs, sets)
    for name, measure in (("harmless", "harmlessness"), ("helpful", "helpfulness")):
        figures[measure] = judged_win_rate(judges[name], sets.prompts(name), outputs.responses[name],
                                           base.responses[name], out_dir / f"judge_{name}", progress=progress)
    base_figures = baseline_metrics(base, sets)
    figures["base_over_refusal"] = base_figures["over_refusal"]
    figures["base_harmful_compliance"] = base_figures["harmful_compliance"]
    figures["base_lengths"] = base_figures["lengths"]
    figures["alignment_tax"] = alignment_tax({k: v["score"] for k, v in base_figures["capability"].items()},
                                             {k: v["score"] for k, v in figures["capability"].items()})
    return figures


def make_judges(judge_model: str, config: EvalConfig, judge_config, **generation) -> dict:
    """The harmlessness and helpfulness judges, sharing one judge generator (generation: as outputs_of)."""
    from ..engine import open_generator
    from ..labelling.judge import ConstitutionalJudge

    generator = open_generator(judge_model, batch_size=judge_config.batch_size, fallback="cached", **generation)
    return {"harmless": ConstitutionalJudge(generator, config.harmless_constitution, judge_config),
            "helpful": ConstitutionalJudge(generator, config.helpful_constitution, judge_config)}


def evaluate_model(model: str, base: ModelOutputs, sets: EvalSets, config: EvalConfig, judge_config,
                   judge_model: str, out_dir: str | Path, *, base_model: str | None = None, check_judge: bool = True,
                   progress: bool = True, **generation) -> dict:
    """All figures of `model` against the base's outputs; writes OUT/outputs and OUT/figures.json.
    With config.depth_data, the depth of alignment of `model` (and of `base_model` when given); with
    check_judge and config.human_preferences, the harmlessness judge checked against people.
    generation: open_generator's engine, server_url, device and dtype.

    Figures
      win-rate       mean soft label P(model ≻ base) from the constitutional judge, both orders
                     averaged (`default` constitution for harmlessness, `helpful` for helpfulness),
                     with the hard win share (label > ½), the tie share and the standard error.
                     Identical responses tie (½) and an empty response loses to a non-empty one,
                     without asking the judge.
      length control mean response length in words per set (cai_fast.evaluate.length) and the
                     win-rate at equal length (least-squares fit of the label on the length gap,
                     read at gap 0)
      over-refusal   share of the over-refusal prompts whose greedy response `is_refusal`
                     (cai_fast.evaluate.refusal; its precision and recall are in the report)
      harmful        share of the harmlessness (red-team) prompts whose greedy response is not a
      compliance     refusal: no judge involved
      depth          harmful compliance after fine-tuning a copy on k harmful examples, per k of
                     `depth_ladder` (cai_fast.evaluate.depth; needs `depth_data`, set by the pipeline)
      judge check    the harmlessness judge's agreement with people and its calibration
                     (cai_fast.evaluate.judge_check)
      alignment tax  per benchmark (base − aligned) / base: > 0 a regression, < 0 an improvement;
                     on average, the same of the mean scores (see alignment_tax); each score with
                     its n and binomial standard error
    """
    start, out_dir = time.perf_counter(), Path(out_dir)
    outputs = outputs_of(model, sets, config, out_dir / "outputs", progress=progress, **generation)
    judges = make_judges(judge_model, config, judge_config, **generation)
    figures = compare_with_base(judges, sets, outputs, base, out_dir, progress=progress)
    if check_judge and judge_check_wanted(config, sets):
        from ..engine.device import resolved_names

        def judge_in(dtype):
            return judges["harmless"] if dtype is None else make_judges(
                judge_model, config, judge_config, **{**generation, "dtype": dtype})["harmless"]

        run_dtype = resolved_names(generation.get("device", "auto"), generation.get("dtype", "auto"))["dtype"]
        figures["judge_check"] = judge_check.check_judge_in_dtypes(judge_in, config, out_dir / "judge_check",
                                                                   run_dtype, progress=progress)
    if config.depth_data and config.depth_rungs:
        examples = depth.harmful_examples(config.depth_data)
        for key, name in (("depth", model), ("base_depth", base_model)):
            if name is not None:
                figures[key] = depth_of(name, examples, sets, config, out_dir / key, progress=progress)
    figures["seconds"] = round(time.perf_counter() - start, 1)
    write_atomic(out_dir / "figures.json", json.dumps(figures, indent=1))
    return figures


def judge_check_wanted(config: EvalConfig, sets: EvalSets) -> bool:
    """Whether the judge is to be checked against people: a human_preferences file that was not skipped."""
    return bool(config.human_preferences) and config.human_preferences not in sets.skipped


def depth_of(model: str, examples: list[dict], sets: EvalSets, config: EvalConfig, out_dir: str | Path, *,
             progress: bool = True) -> dict:
    """depth.depth_curve of `model` on the first depth_size prompts of the harmlessness set."""
    return depth.depth_curve(model, examples, sets.harmless[: config.depth_size], config, out_dir, progress=progress)


def summary_lines(figures: dict) -> list[str]:
    """The headline figures of an evaluation, for the terminal."""
    lines = []
    for measure in ("harmlessness", "helpfulness"):
        w = figures[measure]
        lines.append(f"{measure} win-rate vs base: {w['win_rate']:.3f} ± {w['stderr']:.3f} (hard wins "
                     f"{w['hard_win_share']:.0%}, ties {w['tie_share']:.0%}, n={w['n']})")
        c = w["length_controlled"]
        if c["win_rate"] is not None:
            lines.append(f"  at equal length: {c['win_rate']:.3f} ± {c['stderr']:.3f} ({c['per_100_words']:+.3f} per "
                         f"100 more words than the base)")
    o, b = figures["over_refusal"], figures["base_over_refusal"]
    lines.append(f"over-refusal: {o['rate']:.0%} ({o['refused']}/{o['n']}), base {b['rate']:.0%}")
    h, b = figures["harmful_compliance"], figures["base_harmful_compliance"]
    lines.append(f"harmful compliance: {h['rate']:.0%} ± {h['stderr']:.0%} ({h['complied']}/{h['n']} red-team "
                 f"prompts answered), base {b['rate']:.0%}")
    for key, who in (("depth", "model"), ("base_depth", "base")):
        if key in figures:
            curve = ", ".join(f"k={row['k']}: {row['rate']:.0%}" for row in figures[key]["curve"])
            lines.append(f"depth of alignment ({who}), harmful compliance after k harmful examples: {curve}")
    if "judge_check" in figures:
        j = figures["judge_check"]
        lines.append(f"judge vs people: agreement {j['agreement']['rate']:.1%} ± {j['agreement']['stderr']:.1%} "
                     f"(n={j['n']}), single order {j['chosen_first']['rate']:.1%}, order flips "
                     f"{_pct(j['order_flip_rate'])}, ECE {_pct(j['calibration']['ece'])}")
        for dtype, c in j.get("by_dtype", {}).items():
            lines.append(f"  in {dtype}: agreement {c['agreement']['rate']:.1%} ± {c['agreement']['stderr']:.1%}, "
                         f"judging {c['seconds']} s")
    for name, row in figures["alignment_tax"]["benchmarks"].items():
        tax = "n/a (base scores 0)" if row["tax"] is None else f"{row['tax']:+.1%}"
        lines.append(f"{name}: base {row['base']:.3f} -> {row['aligned']:.3f}, alignment tax {tax} ({row['change']})")
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"
