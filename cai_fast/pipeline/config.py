"""The pipeline's config: PipelineConfig and its file (TOML or JSON).

    load_pipeline_config(FILE | "demo") -> (PipelineConfig, text)      config_dict(config) -> saved form

Config file: TOML (or JSON of the same shape). Top-level fields are PipelineConfig's; each stage has a section
whose fields are its config dataclass's (SECTIONS: [sl_cai] [sft] [label] [judge] [reward] [ppo] [dpo] [eval]).
The training stages' model, data, out, reward_model and ref_model are set by the pipeline, as are PPO's
reward_source, judge_model, constitution and judge_principles (from method, judge_model, constitution and
[judge]); their device and dtype are the top-level ones. Every problem of the file is reported in one
ConfigFileError naming the file and the field (config_from_dict). Relative paths are read from the current
folder. Torch-free. `--config demo`: configs/demo.toml.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import DEFAULT_MODEL, ENGINES, check_finite, option
from ..data import raise_collected
from ..evaluate.config import JUDGE_DTYPES, EvalConfig
from ..labelling.judge_config import JudgeConfig
from ..labelling.config import LabelConfig
from ..sl_cai_config import SLCAIConfig
from ..train.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig
from .gate import FALLBACKS

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
MEASURES = ("harmlessness", "helpfulness", "compliance", "capability")
METHODS = ("ppo", "dpo", "d-rlaif")
RL_STAGES = {"ppo": "ppo", "dpo": "dpo", "d-rlaif": "ppo"}  # the stage (and folder) that trains each method's policy
SECTIONS = {"sl_cai": SLCAIConfig, "sft": SFTConfig, "label": LabelConfig, "judge": JudgeConfig,
            "reward": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig, "eval": EvalConfig}
PIPELINE_SET = ("model", "data", "out", "reward_model", "ref_model", "device", "dtype")  # stage fields it sets
PPO_SET = ("reward_source", "judge_model", "constitution", "judge_principles")  # PPO's reward: method, [judge]


def pipeline_set(cls) -> tuple[str, ...]:
    """The fields of stage config `cls` that the pipeline sets (a file may not)."""
    return PIPELINE_SET + (PPO_SET if cls is PPOConfig else ())
LISTABLE = ("benchmarks", "principle_ids", "server_url")  # string fields a config file may give as a list of strings
_PLACEHOLDER = "(set by the pipeline)"


class ConfigFileError(ValueError):
    """A pipeline config file that cannot be used; the message names the file and the field."""

def _stage(cls):
    """A stage config with the pipeline's placeholders in its required path fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return field(default_factory=lambda: cls(**{k: _PLACEHOLDER for k in ("data", "reward_model") if k in names}))


@dataclass
class PipelineConfig:
    out: str = option("runs/pipeline", "run folder")
    model: str = option(DEFAULT_MODEL, "starting policy: transformers model id or local folder")
    constitution: str = option("default", "constitution of SL-CAI and of the RLAIF labels (name or TOML path)")
    judge_model: str = option("", "model that labels the RLAIF pairs and judges the win-rates (default: model)")
    engine: str = option("cached", "generation backend: cached (prefix-cached), plain, or server (server_url; "
                                   "policies this run trains, PPO rollouts included, still run in this process)")
    server_url: str = option("", "engine server: vLLM or SGLang server URLs, a list or comma-separated")
    device: str = option("auto", "where every model of the run generates, judges, trains and is evaluated: auto, "
                                 "cpu, cuda, cuda:N")
    dtype: str = option("auto", "precision of every model the run generates, judges and evaluates with: auto (bf16 "
                                "where the hardware multiplies bf16 natively), float32, bfloat16, float16; training "
                                "takes it as `cai-fast train --dtype` does (auto: frozen models as above, the trained "
                                "one fp32; [sft] mixed_precision ... autocasts it)")
    method: str = option("ppo", "ppo (reward model, then PPO), dpo, or d-rlaif (PPO on the judge's direct score: "
                                "judge_model rates each rollout 1-9 under [judge] principles principles of the "
                                "constitution; no labels, no reward model)")
    rounds: int = option(1, "rounds of the loop (1-4)")
    prompts: str = option("red_team", "training prompts: a file or a shipped set name")
    train_size: int = option(0, "training prompts used, after the evaluation prompts are held apart (0 = all)")
    quality: str = option("harmlessness", "measure whose drop stops the loop, or weights "
                                           "'harmlessness=1,helpfulness=1' (measures: " + ", ".join(MEASURES) + ")")
    tolerance: float = option(0.05, "stop when quality falls below the previous round's by more than this fraction")
    evaluate_sft: bool = option(True, "also evaluate each round's SFT policy (the paper's SL-CAI model) where PPO "
                                      "or DPO follows it, so the report shows what each stage moved")
    reward_bar: float = option(0.5, "PPO runs only on a reward model whose held-out accuracy's 95% interval lies "
                                     "above this (0.5: better than chance; 0 = always)")
    on_weak_reward: str = option("sft", "a round whose reward model misses reward_bar: sft (keep the SFT policy), "
                                        "dpo (DPO on the labels instead) or ppo (PPO anyway)")
    label_dtype: str = option("", "precision of the labelling judge: '' (the run's dtype), a dtype, or auto: the "
                                  "dtype of eval.human_dtypes whose agreement with people (the judge_check stage) "
                                  "beats the run's dtype's by more than the standard error of the difference, "
                                  "else the run's")
    sl_cai: SLCAIConfig = _stage(SLCAIConfig)
    sft: SFTConfig = _stage(SFTConfig)
    label: LabelConfig = _stage(LabelConfig)
    judge: JudgeConfig = _stage(JudgeConfig)
    reward: RewardConfig = _stage(RewardConfig)
    ppo: PPOConfig = _stage(PPOConfig)
    dpo: DPOConfig = _stage(DPOConfig)
    eval: EvalConfig = _stage(EvalConfig)

    def __post_init__(self):
        check_finite(self)
        if not 1 <= self.rounds <= 4:
            raise ValueError(f"rounds must be between 1 and 4, got {self.rounds}")
        if self.method not in METHODS or self.engine not in ENGINES:
            raise ValueError(f"method must be one of {METHODS} and engine one of {ENGINES}, got "
                             f"{self.method!r} and {self.engine!r}")
        if self.on_weak_reward not in FALLBACKS or not 0 <= self.reward_bar < 1:
            raise ValueError(f"on_weak_reward must be one of {FALLBACKS} and reward_bar in [0, 1), got "
                             f"{self.on_weak_reward!r} and {self.reward_bar}")
        if self.method == "ppo" and self.reward_bar > 0 and not self.reward.eval_fraction:
            raise ValueError("reward_bar needs held-out pairs to measure the reward model on: set [reward] "
                             "eval_fraction > 0, or reward_bar = 0 to run PPO on any reward model")
        if self.engine == "server" and not self.server_url:
            raise ValueError('engine "server" needs server_url = ["http://HOST:PORT", ...]')
        if not 0 <= self.tolerance < 1 or self.train_size < 0:
            raise ValueError(f"tolerance must be in [0, 1) and train_size >= 0, got {self.tolerance} "
                             f"and {self.train_size}")
        if self.label_dtype not in ("", "auto", *JUDGE_DTYPES):
            raise ValueError(f"label_dtype must be '', auto or one of {', '.join(JUDGE_DTYPES)}, got {self.label_dtype!r}")
        if self.label_dtype == "auto" and not (self.eval.human_preferences and self.eval.judge_dtypes):
            raise ValueError("label_dtype = \"auto\" chooses by the judge's agreement with people in each dtype: set "
                             "eval.human_preferences and eval.human_dtypes (e.g. \"bfloat16,float32\")")
        weights = self.quality_weights
        if weights.get("capability") and not self.eval.benchmark_paths:
            raise ValueError("quality weighs 'capability', but eval.benchmarks names no benchmark")

    @property
    def quality_weights(self) -> dict[str, float]:
        """{measure: weight} parsed from `quality`; ValueError naming what is wrong."""
        weights = {}
        for part in filter(None, (p.strip() for p in self.quality.split(","))):
            name, _, weight = part.partition("=")
            name = name.strip()
            if name not in MEASURES:
                raise ValueError(f"quality: unknown measure {name!r}; measures: {', '.join(MEASURES)}")
            try:
                weights[name] = float(weight) if weight else 1.0
            except ValueError:
                raise ValueError(f"quality: weight of {name!r} must be a number, got {weight!r}") from None
        if not weights or any(not math.isfinite(w) or w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise ValueError(f"quality must name measures with finite weights >= 0 and a positive total, got "
                             f"{self.quality!r}")
        return weights

    @property
    def label_judge_model(self) -> str:
        return self.judge_model or self.model

    @property
    def eval_judge_model(self) -> str:
        return self.eval.judge_model or self.label_judge_model

# ---------------------------------------------------------------- the config file


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a shipped config ("demo")."""
    path = Path(name)
    shipped = CONFIGS_DIR / f"{name}.toml"
    if not path.exists() and path.suffix == "" and len(path.parts) == 1 and shipped.is_file():
        return shipped
    return path


def load_pipeline_config(name: str | Path) -> tuple[PipelineConfig, str]:
    """(the config, the file's text) of a TOML or JSON config file or a shipped config name."""
    path = resolve_config_path(name)
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.toml")))
        raise ConfigFileError(f"{path}: config file not found; give a TOML or JSON file, or a shipped config "
                              f"({shipped})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigFileError(f"{path}: not UTF-8 text (bad byte at offset {err.start}); save the file as "
                              "UTF-8") from None
    return config_from_dict(_parse(text, path), str(path)), text


def _parse(text: str, path: Path) -> dict:
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigFileError(f"{path}: not valid {kind} ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the config must be a table of fields, got {type(data).__name__}")
    return data


def config_from_dict(data: dict, source: str) -> PipelineConfig:
    """PipelineConfig from a parsed config file; one ConfigFileError naming `source` and the field
    of every problem (data.raise_collected lists the first ten).

    An unknown field, a value of the wrong type or an invalid value is a problem; each field's value
    is checked on its own, then the section as a whole. cai_fast.pipeline.check_inputs does the same
    for the files and models the config names. Torch-free: imports only the stages' config modules
    and cai_fast.data's raise_collected.
    """
    problems: list[ConfigFileError] = []
    top = {k: v for k, v in data.items() if k not in SECTIONS}
    if isinstance(top.get("quality"), dict):
        weights = _weights_text(top.pop("quality"), source, problems)
        top.update({"quality": weights} if weights else {})
    values = _checked(PipelineConfig, top, source, "", problems)
    sections = {name: _section(name, cls, data.get(name, {}), source, problems) for name, cls in SECTIONS.items()}
    sections = {name: section for name, section in sections.items() if section is not None}
    config = _built(PipelineConfig, sections, values, f"{source}: ", problems)
    raise_collected(problems, source, "problems")
    return config


def _weights_text(table: dict, source: str, problems: list) -> str | None:
    for name, weight in table.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            problems.append(ConfigFileError(f"{source}: field 'quality.{name}' must be a number (a weight), got "
                                            f"{weight!r}"))
            return None
    return ",".join(f"{name}={weight}" for name, weight in table.items())


def _section(name: str, cls, table, source: str, problems: list):
    """The section's config, or None when it has problems (added to `problems`)."""
    if not isinstance(table, dict):
        problems.append(ConfigFileError(f"{source}: [{name}] must be a table of {cls.__name__} fields, got "
                                        f"{type(table).__name__}"))
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    placeholders = {k: _PLACEHOLDER for k in ("data", "reward_model") if k in names}
    values = _checked(cls, table, source, f"{name}.", problems)
    return _built(cls, placeholders, values, f"{source}: [{name}] ", problems)


def _built(cls, fixed: dict, values: dict, where: str, problems: list):
    """cls(**fixed, **values), or None after adding to `problems` each value it refuses. Values are
    taken one at a time and a refused one is tried again once others are in (engine "server" needs
    server_url), so that every bad value is named, and only bad values."""
    accepted, refused, errors, changed = {}, dict(values), {}, True
    while refused and changed:
        changed, errors = False, {}
        for key in list(refused):
            try:
                cls(**fixed, **accepted, **{key: refused[key]})
            except ValueError as err:
                errors[key] = err
            else:
                accepted[key], changed = refused.pop(key), True
    if not refused:
        try:
            return cls(**fixed, **accepted)
        except ValueError as err:  # refused with no value of the file's (a default's problem)
            errors = {"": err}
    problems += [ConfigFileError(f"{where}{err}") for err in errors.values()]
    return None


def _checked(cls, table: dict, source: str, prefix: str, problems: list) -> dict:
    """The table's fields that are known to `cls`, not set by the pipeline, and of the default's
    type; each other field adds a problem."""
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in SECTIONS}
    fixed = pipeline_set(cls)
    values = {}
    for key, value in table.items():
        where = f"{source}: field '{prefix}{key}'"
        if key not in known:
            problems.append(ConfigFileError(f"{where}: unknown field; {cls.__name__} fields are: "
                                            f"{', '.join(k for k in known if not prefix or k not in fixed)}"))
        elif prefix and key in fixed:
            problems.append(ConfigFileError(f"{where}: set by the pipeline (from the top-level model, judge_model, "
                                            "constitution, method, device and dtype, [judge] and the previous "
                                            "stages); remove it"))
        else:
            try:
                _check_type(value, known[key].default, key, where)
                values[key] = value
            except ConfigFileError as err:
                problems.append(err)
    return values


def _check_type(value, default, key: str, where: str) -> None:
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool) or value in (0, 1), "true, false, 1 or 0"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif key in LISTABLE:
        ok, kind = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)), \
            "a string or a list of strings"
    else:
        ok, kind = isinstance(value, str), "a string"
    if not ok:
        raise ConfigFileError(f"{where}: must be {kind}, got {type(value).__name__} {value!r:.60}")


def config_dict(config: PipelineConfig) -> dict:
    """The config as saved beside the run: every field, without the run folder and the pipeline's paths."""
    top = {f.name: getattr(config, f.name) for f in dataclasses.fields(PipelineConfig)
           if f.name not in SECTIONS and f.name != "out"}
    for name in SECTIONS:
        section = getattr(config, name)
        top[name] = {k: v for k, v in asdict(section).items() if k not in pipeline_set(type(section))}
    return top
