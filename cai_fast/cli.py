"""The `cai-fast` command: one subcommand per stage, flat options with help, good defaults.

Options come from the stages' config dataclasses through transformers' HfArgumentParser, as in trl:
`--snake_case` and `--dash-case` both work, booleans are real (`--defend`, `--defend 0`, `--no_defend`), and
trl's names are aliases of ours (`--model_name_or_path` for `--model`, ... see TRL_NAMES; `--bf16`, `--use_peft`).
Every command but `pipeline` (whose --config is the pipeline file) takes `--config FILE.yaml|json`: its keys
(any of those names) become the defaults, and flags on the command line override them. Errors a user can fix
(bad files, bad options, a model that cannot load, a run folder made with another config) end the command
with a one-line message and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import signal
import sys
import typing
from pathlib import Path

from .config import ModelOptions
from .data.constitution import ConstitutionError
from .data import FORMATS, PromptLoadError
from .engine import DEFAULT_MODEL, ENGINES, ModelLoadError
from .engine.server import ServerError
from .evaluate.config import EvalConfig
from .labelling.config import LabelConfig
from .labelling.judge_config import JudgeConfig
from .sl_cai_config import SLCAIConfig
from .revisions import revisions_line
from .store import RunConfigError

USER_ERRORS = (ConstitutionError, PromptLoadError, ModelLoadError, RunConfigError, ServerError, ValueError, OSError)


# trl's (transformers') names of our options, accepted as aliases on every command that has them
TRL_NAMES = {"model": "--model_name_or_path", "out": "--output_dir", "lr": "--learning_rate",
             "batch_size": "--per_device_train_batch_size", "grad_accum": "--gradient_accumulation_steps",
             "epochs": "--num_train_epochs", "save_every": "--save_steps", "lr_scheduler": "--lr_scheduler_type"}


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """--snake_case and --dash-case options for every field of a config dataclass, with its
    default, help and trl alias (HfArgumentParser's rules: bool fields are real flags)."""
    from transformers.hf_argparser import HfArgumentParser

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        f = copy.copy(f)
        f.type = hints[f.name]
        f.metadata = {"help": f"{f.metadata.get('help', '')} (default: {f.default})",
                      "aliases": [TRL_NAMES[f.name]] if f.name in TRL_NAMES else []}
        HfArgumentParser._parse_dataclass_field(parser, f)


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_generation_run_options(parser: argparse.ArgumentParser, out: str) -> None:
    """What every command that generates with a model and a constitution takes."""
    parser.add_argument("--constitution", default="default",
                        help="constitution name (default, helpful) or path to a TOML file (default: default)")
    parser.add_argument("--out", TRL_NAMES["out"], default=out, help=f"output folder (default: {out})")
    add_dataclass_options(parser, ModelOptions)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def load_generator(args: argparse.Namespace, batch_size: int, **given):
    """The generator of the command's ModelOptions (--model, --engine, --server-url, --device), with the
    options in `given` (model, engine, server_url, api_key_env: a role's own) over them."""
    from .engine import open_generator

    options = dataclasses.replace(dataclass_from_args(ModelOptions, args), **given)
    return open_generator(options.model, engine=options.engine, batch_size=batch_size, server_url=options.server_url,
                          device=options.device, dtype=options.dtype, block_size=options.kv_block_size,
                          api_key_env=options.api_key_env)


def run_options(args: argparse.Namespace) -> dict:
    """What the run config records of the model options: what changes the data, with the device and
    dtype that auto chose on this machine. The inputs are recorded by content hash (the stages do
    that for theirs; the model's is model_sha256), not by the path the user typed. A chat API's
    model is its name at its URL (nothing runs here: no device, no dtype); the name of its key's
    variable is kept, never the key, and only for that engine (older run folders stay resumable)."""
    from .config import CHAT_API
    from .engine.device import resolved_names
    from .engine.loading import model_sha256

    options = dataclasses.asdict(dataclass_from_args(ModelOptions, args))
    if options["engine"] == CHAT_API:
        return options
    del options["api_key_env"]
    return {**options, "model_sha256": model_sha256(options["model"]),
            **resolved_names(options["device"], options["dtype"])}


def add_prompt_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--prompts", default=default,
                        help=f"prompt file or shipped set name (default: {default})")
    parser.add_argument("--prompt-format", default="auto", choices=FORMATS,
                        help="format of --prompts (default: auto, from the extension and content)")
    parser.add_argument("--prompt-column", default=None,
                        help="field holding the prompt in JSONL/CSV files (default: prompt, text, ...)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai-fast", description="Constitutional AI, end to end, fast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sl = sub.add_parser("sl-cai", help="critique-and-revise answers to red-team prompts (SL-CAI data)",
                        description="Initial answers, then K rounds of critique and revision, each "
                                    "against a principle sampled from the constitution; writes SFT and "
                                    "preference datasets in trl's formats. Re-run to resume.")
    add_prompt_options(sl, "red_team")
    add_generation_run_options(sl, "runs/sl-cai")
    add_dataclass_options(sl, SLCAIConfig)
    sl.set_defaults(func=cmd_sl_cai)
    add_label_parser(sub)
    add_train_parser(sub)
    add_pipeline_parsers(sub)
    return parser


def cmd_sl_cai(args: argparse.Namespace) -> None:
    from .data.constitution import load_constitution
    from .data import load_prompts
    from .sl_cai import feedback_digests, feedback_generators, run_sl_cai

    config = dataclass_from_args(SLCAIConfig, args)
    constitution = load_constitution(args.constitution)
    prompts = load_prompts(args.prompts, fmt=args.prompt_format, column=args.prompt_column, limit=args.limit)
    print(prompts.report.summary(), flush=True)
    digests = feedback_digests(config, args.engine)  # a critic or reviser that is not there: before any load
    generator = load_generator(args, config.batch_size)
    info = {**run_options(args), **digests, "limit": args.limit}
    policy = {"model": args.model, "engine": args.engine, "server_url": args.server_url,
              "api_key_env": args.api_key_env}
    feedback = feedback_generators(generator, policy, config, lambda given: load_generator(args, config.batch_size,
                                                                                           **given))
    result = run_sl_cai(generator, constitution, prompts, config, **feedback, out_dir=args.out,
                        run_info=info, progress=not args.quiet)
    print_summary(result.summary, args.out)


def print_summary(summary: dict, out: str) -> None:
    s = summary
    print(f"\nSL-CAI done: {s['prompts']} prompts ({s['resumed']} from an earlier run), {s['rounds']} "
          f"round(s), {s['generated_tokens']} tokens generated in {s['seconds']} s; "
          f"{s['preference_pairs']} preference pairs ({s['unchanged']} unchanged answers left out).")
    print(f"SL-CAI {revisions_line(s)}.")
    if len({json.dumps(m, sort_keys=True) for m in s["models"].values()}) > 1:  # a critic or reviser of its own
        print("Written by: " + "; ".join(f"{role} {m['model']} ({m['engine']['generator']})"
                                         for role, m in s["models"].items()) + ".")
    if "api_usage" in s:
        from .labelling.report import usage_text

        print(f"API usage: {usage_text(s['api_usage'])}; over every invocation of this run: "
              f"{usage_text(s['api_usage_all_runs'])}.")
    if s["too_few"]:
        print(f"Warning: {s['too_few']}.")
    print(f"Run folder: {out}")
    for name, path in s.get("files", {}).items():
        print(f"  {name:<22} {path}")


def add_train_parser(sub) -> None:
    """`cai-fast train sft|reward|dpo|ppo`: one config dataclass per stage, its fields as options."""
    from .train import STAGES

    parser = sub.add_parser("train", help="train a policy or reward model (SFT, reward, DPO, PPO)",
                            description="Training stages. Re-run the same command to resume from the "
                                        "latest checkpoint; several processes: torchrun --nproc_per_node N "
                                        "-m cai_fast.cli train ... (CPU) or accelerate launch (GPUs).")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, stage in STAGES.items():
        sub_parser = stages.add_parser(name, help=stage.help, description=stage.help + ".")
        add_dataclass_options(sub_parser, stage.config)
        add_trl_switches(sub_parser)
        sub_parser.add_argument("--quiet", action="store_true", help="no progress bar")
        sub_parser.set_defaults(func=cmd_train, train_stage=stage)


def add_trl_switches(parser: argparse.ArgumentParser) -> None:
    """trl's --bf16, --fp16, --use_cpu and --use_peft on a training stage (for --mixed-precision,
    --device cpu, --lora-r)."""
    for precision in ("bf16", "fp16"):
        parser.add_argument(f"--{precision}", action="store_const", const=precision, dest="mixed_precision",
                            help=f"trl's name of --mixed-precision {precision}")
    parser.add_argument("--use_cpu", "--use-cpu", action="store_const", const="cpu", dest="device",
                        help="trl's (transformers') name of --device cpu")
    parser.add_argument("--use_peft", "--use-peft", action="store_true",
                        help=f"trl's switch for LoRA: --lora-r {TRL_LORA_R} unless --lora-r is given")


TRL_LORA_R = 16  # trl's default LoRA rank, which --use_peft alone gives


def cmd_train(args: argparse.Namespace) -> None:
    from .train.common import readable

    result = args.train_stage.run(train_config(args), progress=not args.quiet)
    shown = {k: v for k, v in result.summary.items() if k != "final"}
    final = readable(result.summary.get("final", {}))
    print(f"\n{args.stage} done: {shown}\nlast step: {final}\nOutput folder: {result.out} "
          f"(metrics: {result.out / 'metrics.jsonl'})")


def train_config(args: argparse.Namespace):
    """The training stage's config from its options (trl's --use_peft alone means --lora-r 16)."""
    if args.use_peft and not args.lora_r:
        args.lora_r = TRL_LORA_R
    return dataclass_from_args(args.train_stage.config, args)


def add_label_parser(sub) -> None:
    """`cai-fast label`: sample and judge pairs (--prompts) or judge given pairs (--pairs)."""
    lb = sub.add_parser("label", help="RLAIF preference labels from a constitutional judge",
                        description="Sample N responses per prompt and judge pairs of them (or judge the "
                                    "pairs of --pairs) under P principles in both orders; writes a trl "
                                    "preference dataset with soft labels and a report. Re-run to resume.")
    add_prompt_options(lb, "red_team")
    lb.add_argument("--pairs", default=None,
                    help="judge the pairs of this JSONL file instead of sampling: trl preference records "
                         "(prompt/chosen/rejected, strings or messages), SL-CAI's preference output, or "
                         "hh-rlhf transcripts; --limit applies to it")
    add_generation_run_options(lb, "runs/label")
    add_dataclass_options(lb, LabelConfig)
    add_dataclass_options(lb, JudgeConfig)
    lb.set_defaults(func=cmd_label)


def cmd_label(args: argparse.Namespace) -> None:
    from .data.constitution import load_constitution
    from .data import load_prompts
    from .labelling.judge import ConstitutionalJudge, resolve_principles
    from .labelling.report import summary_lines
    from .labelling.run import run_labelling
    from .labelling.pairs import load_pairs

    label_config, judge_config = dataclass_from_args(LabelConfig, args), dataclass_from_args(JudgeConfig, args)
    constitution = load_constitution(args.constitution)
    resolve_principles(constitution, judge_config)  # fail before the model loads
    if args.pairs:
        source = load_pairs(args.pairs, limit=args.limit)
        print(source.summary(), flush=True)
    else:
        source = load_prompts(args.prompts, fmt=args.prompt_format, column=args.prompt_column, limit=args.limit)
        print(source.report.summary(), flush=True)
    generator = load_generator(args, judge_config.batch_size)
    judge = ConstitutionalJudge(generator, constitution, judge_config)
    info = {**run_options(args), "limit": args.limit}
    result = run_labelling(judge, list(source), label_config, out_dir=args.out, run_info=info,
                           progress=not args.quiet)
    print("\nlabelling done: " + "\n  ".join(summary_lines(result.summary)))
    print(f"Run folder: {args.out}")
    for name, path in result.summary.get("files", {}).items():
        print(f"  {name:<22} {path}")


def add_pipeline_parsers(sub) -> None:
    """`cai-fast pipeline --config FILE` (the whole loop) and `cai-fast evaluate` (a model against a base)."""
    from .pipeline.config import PipelineConfig

    pl = sub.add_parser("pipeline", help="the full loop: SL-CAI, SFT, RLAIF labels, reward model, PPO or DPO, "
                                         "evaluation, for 1-4 rounds, and a report",
                        description="Runs the rounds a config file describes (see cai_fast.pipeline) and writes "
                                    "report.md in the run folder. Re-run the same command to resume.")
    pl.add_argument("--config", required=True,
                    help="pipeline config: a TOML or JSON file, or a shipped config name (demo)")
    pl.add_argument("--out", default=None, help="run folder (default: the config's `out`)")
    for name in ("device", "dtype"):
        f = next(f for f in dataclasses.fields(PipelineConfig) if f.name == name)
        pl.add_argument(f"--{name}", default=None, help=f"{f.metadata['help']} (default: the config's `{name}`)")
    pl.add_argument("--quiet", action="store_true", help="no progress bars")
    pl.set_defaults(func=cmd_pipeline)
    ev = sub.add_parser("evaluate", help="win-rates, over-refusal and alignment tax of a model against a base",
                        description="Evaluates --model against --base (see cai_fast.evaluate); writes the "
                                    "outputs and figures.json to --out. Re-run to resume.")
    ev.add_argument("--model", TRL_NAMES["model"], required=True,
                    help="the model to evaluate: transformers id or local folder")
    ev.add_argument("--base", default=DEFAULT_MODEL, help=f"the model it is compared with (default: {DEFAULT_MODEL})")
    ev.add_argument("--out", TRL_NAMES["out"], default="runs/evaluate", help="output folder (default: runs/evaluate)")
    ev.add_argument("--engine", default="cached", choices=ENGINES, help="generation backend (default: cached)")
    ev.add_argument("--server-url", default="", help="with --engine server: server URLs, comma-separated; a model "
                                                     "they do not serve runs in this process")
    for name in ("device", "dtype"):
        f = next(f for f in dataclasses.fields(ModelOptions) if f.name == name)
        ev.add_argument(f"--{name}", default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_options(ev, EvalConfig)
    add_dataclass_options(ev, JudgeConfig)
    ev.set_defaults(func=cmd_evaluate)


def cmd_pipeline(args: argparse.Namespace) -> None:
    from .engine.device import resolve_device, resolve_dtype
    from .pipeline.config import load_pipeline_config, resolve_config_path
    from .pipeline.rounds import check_inputs, run_pipeline

    config, source = load_pipeline_config(args.config)
    where = str(resolve_config_path(args.config))
    given = {name: getattr(args, name) for name in ("out", "device", "dtype") if getattr(args, name)}
    config = dataclasses.replace(config, **given)
    # a device or dtype that does not exist here: one line, before anything loads
    device = _checked("device", given, where, lambda: resolve_device(config.device))
    _checked("dtype", given, where, lambda: resolve_dtype(config.dtype, device))
    check_inputs(config, where)  # every missing input at once, before any write
    state = run_pipeline(config, source=source, progress=not args.quiet)
    print(f"\npipeline done: {len(state['qualities'])} round(s), qualities {[round(q, 4) for q in state['qualities']]}"
          f"{' (stopped early)' if state['stopped_early'] else ''}; best round {state['best_round']}, "
          f"policy {state['best_policy']}")
    print(f"Report: {state['report']}")


def _checked(field: str, given: dict, where: str, check):
    """check(); its DeviceError names the config file and field when the value came from the file."""
    from .engine.device import DeviceError
    from .pipeline.config import ConfigFileError

    try:
        return check()
    except DeviceError as err:
        if field in given:
            raise
        raise ConfigFileError(f"{where}: field '{field}': {err}") from None


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .engine.loading import resolve_model_path
    from .evaluate.run import evaluate_model, load_eval_sets, outputs_of, summary_lines

    config, judge_config = dataclass_from_args(EvalConfig, args), dataclass_from_args(JudgeConfig, args)
    for name in (args.model, args.base, config.judge_model):
        if name:
            resolve_model_path(name)  # before the base model's outputs are made
    sets, out = load_eval_sets(config), Path(args.out)
    engine = {"engine": args.engine, "server_url": args.server_url, "device": args.device, "dtype": args.dtype}
    base = outputs_of(args.base, sets, config, out / "base", **engine, progress=not args.quiet)
    figures = evaluate_model(args.model, base, sets, config, judge_config, config.judge_model or args.base,
                             out / "model", **engine, base_model=args.base, progress=not args.quiet)
    print("\nevaluation done:\n  " + "\n  ".join(summary_lines(figures)))
    print(f"Figures: {out / 'model' / 'figures.json'}")


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line's namespace; `--config FILE` (not pipeline's) first sets the defaults."""
    parser, argv = make_parser(), list(argv)
    if "--config" in argv and argv[:1] != ["pipeline"]:
        at = argv.index("--config")
        if at + 1 == len(argv):
            parser.error("--config needs a YAML or JSON file")
        config_file = argv.pop(at + 1)
        argv.pop(at)
        apply_config_file(command_parser(parser, argv), config_file)
    return parser.parse_args(argv)


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser of the command that argv names (`train sft`, `label`, ...)."""
    for word in argv:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        parser = choices[word]
    return parser


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make a YAML/JSON file's values the parser's defaults. Keys are option names without
    dashes, in snake_case or dash-case, ours or trl's (`learning_rate: 2e-5`, `bf16: true`)."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise SystemExit(f"cai-fast: error: cannot read the config file {path}: {err}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"cai-fast: error: {path}: the config must be a mapping of option: value")
    by_option = {name: action for action in parser._actions for name in action.option_strings}
    for key, value in values.items():
        action = by_option.get(f"--{key}")
        if action is None:
            raise SystemExit(f"cai-fast: error: {path}: unknown option {key!r} for `{parser.prog}`; "
                             f"see `{parser.prog} --help`")
        if isinstance(action, argparse._StoreConstAction):  # --bf16: true sets the option it stands for
            if value:
                next(a for a in parser._actions if a.dest == action.dest).default = action.const
        else:
            action.default, action.required = value, False


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if getattr(args, "quiet", False):  # transformers' own bars too (loading weights, writing shards)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill unwinds as Ctrl-C does
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"cai-fast: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cai-fast: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    end_process_group()
    return 0


def _interrupt(signum, frame) -> None:
    """SIGTERM as KeyboardInterrupt: the batch being written is cut off whole, the lock let go."""
    raise KeyboardInterrupt


def end_process_group() -> None:
    """After a command that ran under torchrun or accelerate launch: its process group destroyed, as
    torch asks; left to the interpreter's exit, gloo's threads can abort the process ("terminate
    called without an active exception", pytorch/pytorch#190489) and fail a finished run. What still holds
    the group (a DDP model's reducer, in reference cycles with accelerate's objects) is collected first,
    while the group is whole: freed by the interpreter's exit after the group was shut down, it can abort
    the same way."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def run_as_module() -> None:
    """`python -m cai_fast.cli`: main(), and its exit code whatever the interrupt cut short. A KeyboardInterrupt
    raised inside code that exec() runs from a string (a dataclass being made in an import that a SIGTERM cut
    off) is marked unhandled by CPython even when main() catches it, and under `-m` the interpreter then ends
    the process with SIGINT after the exit, not 130. An interrupted run therefore leaves without the
    interpreter's teardown (its files are written and closed by then); the console script `cai-fast` exits
    through Py_Exit and needs none of this."""
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run_as_module()
