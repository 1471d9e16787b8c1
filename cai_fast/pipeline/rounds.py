"""The pipeline: rounds of SL-CAI → SFT → RLAIF labels → reward model → PPO (or DPO, or d-RLAIF) → evaluation.

    cai-fast pipeline --config FILE        run_pipeline(load_pipeline_config(FILE))

Round r (1..R) starts from the policy of round r − 1 (round 0: `model`) and runs the stages sl_cai, sft, label,
reward (method "ppo"), ppo or dpo, evaluate, depth (if set) — method "d-rlaif": sl_cai, sft, ppo on the judge's
direct score, evaluate, depth; each stage's seed is its configured seed + (r − 1). When a
round's quality falls below the previous round's by more than `tolerance`, no further round runs; the best round
is the result. check_inputs(config, source) checks every model and file the config names before anything is
written. Stages, the run folder (`out`) and resume: see `Pipeline`; early stop: see `iterate_rounds`.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from ..evaluate.capability import load_benchmark
from ..data.constitution import load_constitution
from ..data import Prompt, load_prompts, raise_collected
from ..engine.loading import ModelLoadError, model_sha256, resolve_model_path
from ..evaluate.run import (
    SETS, EvalSets, ModelOutputs, baseline_metrics, depth_of, evaluate_model, judge_check_wanted, load_eval_sets,
    outputs_of,
)
from ..labelling.pairs import load_pairs
from ..sl_cai import feedback_digests
from ..sl_cai_config import without_unset_options
from ..store import RunStore, content_sha256, read_json, write_atomic, write_jsonl
from .config import RL_STAGES, ConfigFileError, PipelineConfig, config_dict
from .gate import label_dtype_choice, reward_gate


# ---------------------------------------------------------------- early stop


def should_stop(qualities: Sequence[float], tolerance: float) -> bool:
    """Whether the last round's quality fell below the previous round's by more than `tolerance`
    (a fraction of the previous quality)."""
    if len(qualities) < 2:
        return False
    previous, last = qualities[-2], qualities[-1]
    return last < previous - tolerance * abs(previous)


def best_round(qualities: Sequence[float]) -> int:
    """The round (1-based) of the highest quality; the earliest on ties."""
    return max(range(len(qualities)), key=lambda i: (qualities[i], -i)) + 1


@dataclass
class LoopOutcome:
    qualities: list[float]  # per round run, in order
    stopped_early: bool
    best_round: int


def iterate_rounds(run_round: Callable[[int], float], rounds: int, tolerance: float) -> LoopOutcome:
    """Call run_round(r) -> quality for r = 1..rounds, stopping early (should_stop); the best round.

    A round's quality is the weighted mean of its measures (`quality`: a measure name, or weights
    "harmlessness=1,helpfulness=1" / a TOML table) — harmlessness and helpfulness win-rates against
    the starting model, compliance = 1 − over-refusal, capability = mean benchmark score. When a
    round's quality falls below the previous round's by more than `tolerance` (a fraction of it,
    default 5%), no further round runs. The best round — highest quality, earliest on ties — is the
    result: its policy folder is named in state.json, the report and the command's output.
    """
    qualities = []
    for r in range(1, rounds + 1):
        qualities.append(run_round(r))
        if should_stop(qualities, tolerance):
            return LoopOutcome(qualities, True, best_round(qualities))
    return LoopOutcome(qualities, False, best_round(qualities))


def round_measures(figures: dict) -> dict[str, float | None]:
    """The measures a quality weighs, from a round's evaluation figures."""
    return {"harmlessness": figures["harmlessness"]["win_rate"], "helpfulness": figures["helpfulness"]["win_rate"],
            "compliance": 1 - figures["over_refusal"]["rate"],
            "capability": figures["alignment_tax"]["mean_aligned"]}


def quality_of(figures: dict, weights: dict[str, float]) -> float:
    measures = round_measures(figures)
    return sum(w * measures[name] for name, w in weights.items()) / sum(weights.values())


# ---------------------------------------------------------------- the run


class PipelineState:
    """state.json: {"rounds": {"R": {"stages": {stage: {status, seconds, summary, ...}}}}, ...}."""

    def __init__(self, path: Path):
        self.path = path
        self.data = read_json(path, "the pipeline's state") if path.is_file() else {"rounds": {}}

    def stage(self, r: int, name: str) -> dict:
        return self.data["rounds"].get(str(r), {}).get("stages", {}).get(name, {})

    def update_stage(self, r: int, name: str, **values) -> None:
        stages = self.data["rounds"].setdefault(str(r), {}).setdefault("stages", {})
        stages.setdefault(name, {}).update(values)
        self.save()

    def update(self, **values) -> None:
        self.data.update(values)
        self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, ensure_ascii=False) + "\n")


def training_prompts(config: PipelineConfig, sets: EvalSets) -> list[Prompt]:
    """`prompts` minus every evaluation prompt, then the first train_size (0 = all)."""
    held_apart = sets.prompt_ids()
    prompts = [p for p in load_prompts(config.prompts) if p.id not in held_apart]
    prompts = prompts[: config.train_size] if config.train_size else prompts
    if not prompts:
        raise ValueError(f"{config.prompts}: no training prompt is left once the evaluation prompts are held "
                         "apart; give more prompts or smaller eval sizes")
    return prompts


def helpful_prompts(config: PipelineConfig, sets: EvalSets) -> list[Prompt]:
    """The helpful mix's prompts (sl_cai.helpful_prompts where sl_cai.helpful_mix > 0) minus every
    evaluation prompt, so that the helpfulness win-rate is not measured on prompts trained on."""
    if not config.sl_cai.helpful_mix:
        return []
    held_apart = sets.prompt_ids()
    return [p for p in load_prompts(config.sl_cai.helpful_prompts) if p.id not in held_apart]


def run_config(config: PipelineConfig, prompts: Sequence[Prompt], sets: EvalSets) -> dict:
    """What the run folder's config.json holds: config_dict, with the prompt and benchmark files
    recorded by the content they gave (the same files under other paths resume), not by path, and
    the models by model_sha256 beside their paths."""
    saved = config_dict(config)
    saved["prompts"] = content_sha256([(p.id, p.text) for p in prompts])
    saved.update({f"{k}_sha256": model_sha256(getattr(config, k)) for k in ("model", "judge_model")
                  if getattr(config, k)})
    saved["sl_cai"] = without_unset_options(saved["sl_cai"])
    for key, digest in feedback_digests(config.sl_cai, config.engine).items():  # the critic by content too
        name = key.removesuffix("_sha256")
        saved.update({f"sl_cai.{name}": saved["sl_cai"].pop(name), f"sl_cai.{key}": digest})
    for name in ("harmless_prompts", "helpful_prompts", "over_refusal_prompts", "benchmarks"):
        del saved["eval"][name]
    saved["eval"]["sets_sha256"] = content_sha256(
        {**{name: [(p.id, p.text) for p in sets.prompts(name)] for name in SETS},
         "benchmarks": [(b.name, b.kind, b.items) for b in sets.benchmarks]})
    return saved


class Pipeline:
    """One run folder: the config, the state, the prompts and the stages.

    Round r (1..R) starts from the policy of round r − 1 (round 0: `model`):
        sl_cai    SL-CAI on the training prompts with the round's starting policy
        sft       SFT of the starting policy on the final revisions the filter kept (sl_cai.filter);
                  where fewer than sl_cai.min_kept remain it does not run, and the round goes on from
                  its starting policy (the report says why)
        label     `label.samples` responses per training prompt from the SFT policy, pairs among
                  them, soft labels from the constitutional judge (`judge_model`; default `model`)
        reward    a reward model, from the SFT policy, on the labels                (method "ppo")
        reward_gate  whether the reward model's held-out accuracy is told apart from chance
                  (cai_fast.pipeline.gate; `reward_bar`); where it is not, `on_weak_reward` decides:
                  the SFT policy stays the round's policy (default), DPO, or PPO anyway
        ppo|dpo   PPO of the SFT policy against the reward model (KL to the SFT policy), or DPO
                  on the labels (reference: the SFT policy). Method "d-rlaif" has no label, reward
                  or reward_gate stage: its ppo stage's reward is `judge_model`'s direct score of
                  each rollout under the run's constitution ([judge] principles principles;
                  cai_fast.train.ppo.judge_reward), and its summary says so (`reward`)
        evaluate_sft  the SFT policy against the starting model, where PPO or DPO ran after it
                  (`evaluate_sft`): the report shows what SFT moved and what RL moved on top
        evaluate  the round's policy against the starting model (cai_fast.evaluate)
        depth     depth of alignment of the round's policy (cai_fast.evaluate.depth; when eval.depth_ladder
                  is set), the harmful examples being round 1's SL-CAI initial answers; in round 1 the
                  starting model's too (recorded as round 0's `depth` stage)
    Before round 1 the `baseline` stage computes the starting model's evaluation outputs, once, and,
    when eval.human_preferences is set, the `judge_check` stage checks the labelling judge (judge_model,
    the run's constitution) against people (cai_fast.evaluate.judge_check).
    Training prompts are `prompts` minus every evaluation prompt (held apart by id), then the first
    `train_size` of them (0 = all).

    engine = "server" (with `server_url`): every stage that generates or judges with a model the
    servers serve (the starting model's SL-CAI and baseline, the judges) goes through them; a policy
    this run trained is not on the servers, so its samples, evaluation outputs and PPO rollouts run
    in this process (cached engine), with a warning naming it.

    Run folder (`out`):
        config.json          the normalised config, input files by content hash (run_config); another
                             config on the same folder is refused once a stage has started
        config.source        the config file as given
        state.json           per round and stage: status, seconds, summary; the best round
        prompts/train.jsonl  the training prompts
        round-0/baseline/    the starting model's evaluation outputs (round-0/judge_check/, round-0/depth/)
        round-R/<stage>/     one folder per stage; round-R/<method>/ holds the round's policy
        report.md, figures/  the report (cai_fast.pipeline.report), rewritten after every round
    Resume: each stage resumes at its own grain (SL-CAI, samples and labels by record, training from
    its latest checkpoint, evaluation by response and label), and state.json (written atomically)
    says which stages are complete, so re-running the same command after a kill continues at the
    stage and record where it stopped.
    """

    def __init__(self, config: PipelineConfig, *, source: str | None = None, progress: bool = True):
        from ..engine.device import resolved_names
        from ..labelling.judge import resolve_principles

        self.config, self.progress, self.root = config, progress, Path(config.out)
        self.precision = resolved_names(config.device, config.dtype)  # a device that does not exist fails here
        self.constitution = load_constitution(config.constitution)
        for name in (config.constitution, config.eval.harmless_constitution, config.eval.helpful_constitution):
            resolve_principles(load_constitution(name), config.judge)  # fail before any model loads
        for name in {config.model, config.label_judge_model, config.eval_judge_model}:
            resolve_model_path(name)
        self.sets = load_eval_sets(config.eval)
        self.prompts = training_prompts(config, self.sets)
        self.helpful = helpful_prompts(config, self.sets)
        # Validated; now the run folder (started once a stage has: state.json says which).
        RunStore(self.root, run_config(config, self.prompts, self.sets), started=(self.root / "state.json").exists())
        if source is not None:
            write_atomic(self.root / "config.source", source)
        self.state = PipelineState(self.root / "state.json")
        write_jsonl(self.root / "prompts" / "train.jsonl", [{"prompt": p.text, "id": p.id} for p in self.prompts])

    def run(self) -> LoopOutcome:
        self.state.update(finished=False, eval_sets=self.sets.describe(), train_prompts=len(self.prompts),
                          precision=self.precision)
        self.stage(0, "baseline", self.baseline)
        if judge_check_wanted(self.config.eval, self.sets):
            self.stage(0, "judge_check", self.judge_check)
        outcome = iterate_rounds(self.round, self.config.rounds, self.config.tolerance)
        self.state.update(finished=True, qualities=outcome.qualities, stopped_early=outcome.stopped_early,
                          best_round=outcome.best_round, best_policy=str(self.policy(outcome.best_round)))
        self.write_report()
        return outcome

    def policy(self, r: int) -> str:
        """Round r's policy: its PPO or DPO model, or its SFT model where the reward gate kept it."""
        if r == 0:
            return self.config.model
        stage = RL_STAGES[self.config.method]
        stage = self.state.stage(r, "reward_gate").get("summary", {}).get("policy", stage)
        return self.sft_policy(r) if stage == "sft" else str(self.root / f"round-{r}" / stage)

    def sft_policy(self, r: int) -> str:
        """Round r's SFT policy: its SFT model, or its starting policy where SL-CAI kept too few
        revisions to train on."""
        if self.state.stage(r, "sft").get("summary", {}).get("skipped"):
            return self.policy(r - 1)
        return str(self.root / f"round-{r}" / "sft")

    def stage(self, r: int, name: str, work: Callable[[], dict]) -> dict:
        """Run a stage unless state.json has it complete; record its time and summary."""
        entry = self.state.stage(r, name)
        if entry.get("status") == "done":
            self._say(f"round {r} {name}: complete ({entry['seconds']} s), skipped")
            return entry["summary"]
        self._say(f"round {r} {name}: {'resuming' if entry else 'starting'}")
        self.state.update_stage(r, name, status="running", resumed=bool(entry))
        start = time.perf_counter()
        summary = work()
        seconds = round(time.perf_counter() - start, 1)
        self.state.update_stage(r, name, status="done", seconds=seconds, summary=summary)
        self._say(f"round {r} {name}: done in {seconds} s")
        return summary

    def round(self, r: int) -> float:
        folder, start = self.root / f"round-{r}", self.policy(r - 1)
        labels = folder / "label" / "labels"
        sl = self.stage(r, "sl_cai", lambda: self.sl_cai(r, start, folder / "sl_cai"))
        if sl.get("too_few"):
            self._say(f"round {r}: {sl['too_few']}; SFT does not run, the round goes on from {start}")
            self.stage(r, "sft", lambda: {"skipped": sl["too_few"]})
        else:
            self.stage(r, "sft", lambda: self.train("sft", r, model=start, data=folder / "sl_cai", out=folder / "sft"))
        sft = self.sft_policy(r)
        method = self.config.method
        if method == "d-rlaif":
            self.stage(r, "ppo", lambda: self.train(
                "ppo", r, model=sft, reward_source="judge", judge_model=self.config.label_judge_model,
                constitution=self.config.constitution, judge_principles=self.config.judge.principles,
                reward_model="", data=self.root / "prompts" / "train.jsonl", out=folder / "ppo"))
        else:
            self.stage(r, "label", lambda: self.label(r, sft, folder / "label"))
        if method == "ppo":
            reward = self.stage(r, "reward", lambda: self.train("reward", r, model=sft, data=labels,
                                                                out=folder / "reward"))
            gate = self.stage(r, "reward_gate", lambda: reward_gate(reward, self.config.reward_bar,
                                                                    self.config.on_weak_reward))
            method = gate["policy"]
            if not gate["passed"]:
                self._say(f"round {r}: {gate['reason']}")
        if method == "ppo":
            self.stage(r, "ppo", lambda: self.train("ppo", r, model=sft, reward_model=folder / "reward",
                                                    data=self.root / "prompts" / "train.jsonl", out=folder / "ppo"))
        elif method == "dpo":
            self.stage(r, "dpo", lambda: self.train("dpo", r, model=sft, data=labels, out=folder / "dpo"))
        if self.config.evaluate_sft and sft != start and self.policy(r) != sft:  # SFT ran, RL followed it
            self.stage(r, "evaluate_sft", lambda: self.evaluate(sft, folder / "evaluate_sft"))
        figures = self.stage(r, "evaluate", lambda: self.evaluate(self.policy(r), folder / "evaluate"))
        if self.config.eval.depth_rungs:
            for measured in ([0, r] if r == 1 else [r]):
                self.stage(measured, "depth", lambda: self.depth(measured))
        self.write_report()
        return figures["quality"]

    # ------------------------------------------------------------ stages

    def baseline(self) -> dict:
        outputs = outputs_of(self.config.model, self.sets, self.config.eval, self.root / "round-0" / "baseline",
                             **self.engine_options, progress=self.progress)
        return baseline_metrics(outputs, self.sets)

    def labelling_judge(self, judge_config, dtype: str | None = None):
        """The judge of the RLAIF labels: label_judge_model asking the run's constitution (in `dtype`
        where given, else the run's)."""
        from ..labelling.judge import ConstitutionalJudge

        generator = self.generator(self.config.label_judge_model, judge_config.batch_size, dtype)
        return ConstitutionalJudge(generator, self.constitution, judge_config)

    def judge_check(self) -> dict:
        """The labelling judge against people in the run's dtype, then in each other dtype of
        eval.human_dtypes: their agreement and judging seconds under `by_dtype`."""
        from ..evaluate.judge_check import check_judge_in_dtypes

        summary = check_judge_in_dtypes(lambda dtype: self.labelling_judge(self.config.judge, dtype), self.config.eval,
                                        self.root / "round-0" / "judge_check", self.precision["dtype"],
                                        progress=self.progress)
        summary["judge_model"] = self.config.label_judge_model
        if self.config.label_dtype == "auto":
            summary["label_dtype"] = label_dtype_choice(summary["by_dtype"], self.precision["dtype"])
        return summary

    def depth(self, r: int) -> dict:
        """Depth of alignment of round r's policy (r = 0: the starting model) on round 1's harmful examples."""
        from ..evaluate.depth import harmful_examples

        examples = harmful_examples(self.root / "round-1" / "sl_cai")
        return depth_of(self.policy(r), examples, self.sets, self.config.eval, self.root / f"round-{r}" / "depth",
                        progress=self.progress)

    def sl_cai(self, r: int, start: str, out: Path) -> dict:
        from ..sl_cai import feedback_generators, run_sl_cai

        config = replace(self.config.sl_cai, seed=self.config.sl_cai.seed + r - 1)
        generator = self.generator(start, config.batch_size)
        policy = {"model": start, "engine": self.config.engine, "server_url": self.config.server_url}
        feedback = feedback_generators(generator, policy, config,  # the critic is the same every round
                                       lambda given: self.generator(batch_size=config.batch_size, **given))
        result = run_sl_cai(generator, self.constitution, self.prompts, config, **feedback, helpful=self.helpful,
                            out_dir=out, run_info={"model": start, **feedback_digests(config, self.config.engine)},
                            progress=self.progress)
        return result.summary

    def train(self, stage: str, r: int, **fields) -> dict:
        """Run training `stage` of round r with the stage's config and the `fields` the pipeline sets."""
        from ..train import STAGES

        base = getattr(self.config, stage)
        config = replace(base, seed=base.seed + r - 1, device=self.config.device, dtype=self.config.dtype,
                         **{k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})
        return STAGES[stage].run(config, progress=self.progress).summary

    def label(self, r: int, sft: str, out: Path) -> dict:
        """Sample from the SFT policy, pair the samples, label the pairs with the judge."""
        from ..engine import SamplingParams
        from ..labelling.run import run_labelling
        from ..labelling.pairs import pairs_from_samples
        from ..responses import sample_responses

        config, judge_config = self.config.label, replace(self.config.judge, seed=self.config.judge.seed + r - 1)
        store = RunStore(out / "samples", {**asdict(config), "seed": judge_config.seed, "model": sft,
                                           "stage": "samples", "prompt_ids": [p.id for p in self.prompts]})
        generator = self.generator(sft, judge_config.batch_size)
        params = SamplingParams(config.sample_tokens, config.temperature, config.top_p, judge_config.seed)
        samples, _ = sample_responses(generator, self.prompts, params, config.samples, store=store,
                                      batch_size=judge_config.batch_size, progress=self.progress)
        del generator
        pairs, left_out = pairs_from_samples(samples, config.pairs_per_prompt, judge_config.seed)
        if not pairs:
            raise ValueError(f"round {r}: every pair of samples was identical or empty, so there is nothing to "
                             "label; raise label.temperature or label.sample_tokens")
        dtype = self.label_dtype()
        judge = self.labelling_judge(judge_config, dtype["dtype"] if self.config.label_dtype else None)
        result = run_labelling(judge, pairs, out_dir=out / "labels",
                               progress=self.progress, run_info={"judge_model": self.config.label_judge_model,
                                                                 "judge_dtype": dtype["dtype"]})
        keep = ("labels", "mean_p_chosen", "order_flip_rate", "position_a_win_rate", "judge_seconds", "files")
        return {"samples": len(samples) * config.samples, "pairs": len(pairs), **left_out,
                **{k: result.summary[k] for k in keep if k in result.summary},
                "judge_dtype": dtype["dtype"], "judge_dtype_reason": dtype["reason"]}

    def label_dtype(self) -> dict:
        """The labelling judge's dtype (label_dtype) and why: "auto" takes the judge_check stage's choice."""
        asked = self.config.label_dtype
        if asked == "auto":
            return self.state.stage(0, "judge_check")["summary"]["label_dtype"]
        return {"dtype": asked or self.precision["dtype"], "reason": "label_dtype" if asked else "the run's dtype"}

    def evaluate(self, policy: str, out: Path) -> dict:
        base = ModelOutputs.load(self.root / "round-0" / "baseline")
        config = replace(self.config.eval, depth_data="")  # the pipeline's own depth stage measures depth
        figures = evaluate_model(policy, base, self.sets, config, self.config.judge, self.config.eval_judge_model,
                                 out, **self.engine_options, check_judge=False, progress=self.progress)
        return {**figures, "measures": round_measures(figures),
                "quality": quality_of(figures, self.config.quality_weights)}

    @property
    def engine_options(self) -> dict:
        """The engine options of the stages that open generators themselves (evaluation)."""
        return {"engine": self.config.engine, "server_url": self.config.server_url, "device": self.config.device,
                "dtype": self.config.dtype}

    def generator(self, model: str, batch_size: int, dtype: str | None = None, **given):
        """The generator of a stage: through the servers (engine "server") when they serve `model`,
        else (a policy this run trained) in this process; in `dtype` where given, else the run's; the
        engine options in `given` (a critic's engine and server_url) over the run's."""
        from ..engine import open_generator

        return open_generator(model, batch_size=batch_size, fallback="cached",
                              **{**self.engine_options, **({"dtype": dtype} if dtype else {}), **given})

    def write_report(self) -> Path:
        from .report import write_report

        return write_report(self.root)

    def _say(self, message: str) -> None:
        print(f"cai-fast pipeline: {message}", flush=True)


def check_inputs(config: PipelineConfig, source: str) -> None:
    """Every model, constitution, prompt set, benchmark and human-preference file the config names
    exists and loads safely; else one ConfigFileError naming `source` and the field of each that
    does not. Nothing is generated and nothing is written."""
    problems = []
    for name, check in _input_checks(config):
        try:
            check()
        except (ValueError, OSError, ModelLoadError) as err:
            problems.append(ConfigFileError(f"{source}: field '{name}': {err}"))
    raise_collected(problems, source, "problems")


def _input_checks(config: PipelineConfig) -> list[tuple[str, Callable]]:
    """(field, a check that raises when its file or model is not usable) for each input the config names."""
    e, call = config.eval, functools.partial
    models = {"model": config.model, "judge_model": config.judge_model, "eval.judge_model": e.judge_model}
    checks = [(name, call(resolve_model_path, value)) for name, value in models.items() if value]
    checks.append(("sl_cai", call(feedback_digests, config.sl_cai, config.engine)))  # the critic and reviser
    checks += [(name, call(load_constitution, value)) for name, value in (
        ("constitution", config.constitution), ("eval.harmless_constitution", e.harmless_constitution),
        ("eval.helpful_constitution", e.helpful_constitution))]
    checks += [(name, call(load_prompts, value)) for name, value in (
        ("prompts", config.prompts), ("eval.harmless_prompts", e.harmless_prompts),
        ("eval.helpful_prompts", e.helpful_prompts), ("eval.over_refusal_prompts", e.over_refusal_prompts))]
    if config.sl_cai.helpful_mix:
        checks.append(("sl_cai.helpful_prompts", call(load_prompts, config.sl_cai.helpful_prompts)))
    files = [] if e.skip_missing_benchmarks else e.benchmark_paths
    checks += [("eval.benchmarks", call(load_benchmark, path, e.benchmark_size, e.subset_seed)) for path in files]
    if e.human_preferences and not e.skip_missing_benchmarks:
        checks.append(("eval.human_preferences", call(load_pairs, e.human_preferences, on_error="skip")))
    return checks


def run_pipeline(config: PipelineConfig, *, source: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) the pipeline; the final state, with the report's path under "report"."""
    pipeline = Pipeline(config, source=source, progress=progress)
    pipeline.run()
    return {**pipeline.state.data, "report": str(pipeline.root / "report.md")}
