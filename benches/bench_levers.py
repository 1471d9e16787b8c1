"""What makes the default model's SL-CAI revisions usable: each lever of the demo's SL-CAI stage in
turn, on the demo's training prompts (issue 28's lever table).

    python benches/bench_levers.py [--levers "base;few_shot=0;..."] [--n 48] [--json FILE]

Run from the repository root (the demo config's data paths are relative to it). For each lever
(the demo's [sl_cai] settings with one change) it runs SL-CAI on the first --n training prompts of
the demo (`cai-fast pipeline --config demo`: the red-team prompts minus every evaluation prompt)
and reports, with binomial standard errors over the prompts:
  reply       the final revision is a reply to the user (cai_fast.revisions: what the filter keeps)
  declines    ... and a reply that declines or redirects (cai_fast.refusal's detector)
  commentary  the revision comments on "the response" instead of replying
  unchanged   the revision equals the initial answer
A lever that leaves more replies, and more declining ones, gives SFT more to learn harmlessness from.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from cai_fast.data.constitution import load_constitution
from cai_fast.engine import load_model, make_generator
from cai_fast.evaluate.run import load_eval_sets
from cai_fast.pipeline.config import load_pipeline_config
from cai_fast.pipeline.rounds import training_prompts
from cai_fast.refusal import is_refusal
from cai_fast.revisions import revision_verdict
from cai_fast.sl_cai import run_sl_cai

LEVERS = {  # name -> changes to the demo's [sl_cai]
    "base": {},
    "few_shot=0": {"few_shot": 0},
    "few_shot=3": {"few_shot": 3},
    "fresh": {"revision_turn": "fresh"},
    "fresh,few_shot=3": {"revision_turn": "fresh", "few_shot": 3},
    "rounds=2": {"rounds": 2},
    "temperature=0": {"temperature": 0.0},
    "fresh,temperature=0": {"revision_turn": "fresh", "temperature": 0.0},
}


def share(count: int, n: int) -> dict:
    p = count / n if n else 0.0
    return {"count": count, "share": round(p, 3), "se": round(math.sqrt(p * (1 - p) / n), 3) if n else 0.0}


def measure(generator, constitution, prompts, config) -> dict:
    start = time.perf_counter()
    result = run_sl_cai(generator, constitution, prompts, config, progress=False)
    verdicts = [revision_verdict(r) for r in result.records]
    replies = [r for r, v in zip(result.records, verdicts) if v == "reply"]
    n = len(result.records)
    return {"n": n, "seconds": round(time.perf_counter() - start, 1),
            "reply": share(len(replies), n), "declines": share(sum(is_refusal(r["final"]) for r in replies), n),
            "commentary": share(verdicts.count("commentary"), n), "unchanged": share(verdicts.count("unchanged"), n),
            "example_reply": next((" ".join(r["final"].split())[:160] for r in replies), "")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default=";".join(LEVERS), help="names of LEVERS, separated by ';' (names hold commas)")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    config, _ = load_pipeline_config("demo")
    prompts = training_prompts(config, load_eval_sets(config.eval))[: args.n]
    constitution = load_constitution(config.constitution)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    generator = make_generator(loaded, batch_size=config.sl_cai.batch_size)
    out = {"model": config.model, "dtype": str(loaded.model.dtype), "levers": {}}
    names = args.levers.split(";")
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"unknown levers {unknown}; known: {'; '.join(LEVERS)}")
    print(f"{'lever':<22} {'reply':>13} {'declines':>13} {'commentary':>13} {'unchanged':>13} {'s':>6}", flush=True)
    for name in names:
        figures = out["levers"][name] = measure(generator, constitution, prompts,
                                                replace(config.sl_cai, **LEVERS[name]))
        cells = " ".join(f"{figures[k]['share']:>6.3f}±{figures[k]['se']:.3f}"
                         for k in ("reply", "declines", "commentary", "unchanged"))
        print(f"{name:<22} {cells} {figures['seconds']:>6}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
