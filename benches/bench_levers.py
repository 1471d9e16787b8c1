"""What makes the default model's SL-CAI revisions usable: each lever of the demo's SL-CAI stage in
turn, on the demo's training prompts (issue 28's lever table); and what SFT on them does.

    python benches/bench_levers.py [--levers "base;few_shot=0;..."] [--n 48] [--json FILE]
    python benches/bench_levers.py --sft "start;base;steps=24;..." [--n 48] [--json FILE]

Run from the repository root (the demo config's data paths are relative to it). For each lever
(the demo's [sl_cai] settings with one change) it runs SL-CAI on the first --n training prompts of
the demo (`cai-fast pipeline --config demo`: the red-team prompts minus every evaluation prompt)
and reports, with binomial standard errors over the prompts:
  reply       the final revision is a reply to the user (cai_fast.revisions: what the filter keeps)
  declines    ... and a reply that declines or redirects (cai_fast.refusal's detector)
  commentary  the revision comments on "the response" instead of replying
  unchanged   the revision equals the initial answer
A lever that leaves more replies, and more declining ones, gives SFT more to learn harmlessness from.
The revision request's wording and the principles drawn are levers through the constitution
(CONSTITUTIONS: the default one rewritten).

--sft: SL-CAI with the demo's settings and the filter off (the 135M model leaves too few replies for the
filter to keep), then SFT of the default model on it with one lever changed (SFT_LEVERS: steps, learning
rate, the helpful mix), then the harmful compliance and over-refusal of its greedy answers (the demo's
[eval] sizes and response_tokens, the refusal detector), against the starting model's ("start").
"""

from __future__ import annotations

import argparse
import json
import math
import time
import tempfile
from dataclasses import replace
from pathlib import Path

from cai_fast.data.constitution import load_constitution
from cai_fast.engine import SamplingParams, load_model, make_generator
from cai_fast.evaluate.refusal import harmful_compliance, refusal_rate
from cai_fast.evaluate.run import load_eval_sets
from cai_fast.pipeline.config import load_pipeline_config
from cai_fast.pipeline.rounds import helpful_prompts, training_prompts
from cai_fast.refusal import is_refusal
from cai_fast.responses import sample_responses
from cai_fast.revisions import revision_verdict
from cai_fast.sl_cai import run_sl_cai
from cai_fast.train.sft import train_sft

HARM = ("harm", "child-safety", "privacy", "jailbreak", "dangerous-advice", "manipulation")
CONSTITUTIONS = {  # name -> the default constitution rewritten
    # each revision request asks for the reply itself, not for a rewrite of "the response"
    "reply": lambda c: replace(c, principles=tuple(
        replace(p, revision=f"Reply to my request again, as the assistant. {p.revision} Write only the new reply, "
                            "starting with its first word; do not mention the response or the critique.")
        for p in c.principles)),
    # only the harmlessness principles, as the paper draws harm principles for red-team prompts
    "harm": lambda c: replace(c, principles=tuple(p for p in c.principles if p.category in HARM)),
}

LEVERS = {  # name -> changes to the demo's [sl_cai]
    "base": {},
    "few_shot=0": {"few_shot": 0},
    "few_shot=3": {"few_shot": 3},
    "fresh": {"revision_turn": "fresh"},
    "fresh,few_shot=3": {"revision_turn": "fresh", "few_shot": 3},
    "rounds=2": {"rounds": 2},
    "temperature=0": {"temperature": 0.0},
    "fresh,temperature=0": {"revision_turn": "fresh", "temperature": 0.0},
    "wording=reply": {"constitution": "reply"},
    "wording=reply,few_shot=0": {"constitution": "reply", "few_shot": 0},
    "principles=harm": {"constitution": "harm"},
    "principles=harm,fresh": {"constitution": "harm", "revision_turn": "fresh"},
}
SFT_LEVERS = {  # name -> changes to the demo's [sft] (helpful_mix: to its [sl_cai]); "start": no SFT
    "start": None,
    "base": {},
    "steps=24": {"max_steps": 24},
    "lr=2e-4": {"lr": 2e-4},
    "helpful_mix=1": {"helpful_mix": 1.0},
}


def share(count: int, n: int) -> dict:
    p = count / n if n else 0.0
    return {"count": count, "share": round(p, 3), "se": round(math.sqrt(p * (1 - p) / n), 3) if n else 0.0}


def with_lever(constitution, config, lever: dict):
    """(the constitution, the [sl_cai] config) of a LEVERS entry."""
    changes = dict(lever)
    name = changes.pop("constitution", None)
    return (CONSTITUTIONS[name](constitution) if name else constitution), replace(config, **changes)


def measure(generator, constitution, config, prompts, records: Path | None = None, name: str = "") -> dict:
    """A lever's shares; with `records`, each final revision and its verdict appended there (JSONL, lever `name`)."""
    start = time.perf_counter()
    result = run_sl_cai(generator, constitution, prompts, config, progress=False)
    verdicts = [revision_verdict(r) for r in result.records]
    if records:
        with records.open("a") as f:
            f.writelines(json.dumps({"lever": name, "prompt": r["prompt"], "final": r["final"],
                                     "verdict": v}) + "\n" for r, v in zip(result.records, verdicts))
    replies = [r for r, v in zip(result.records, verdicts) if v == "reply"]
    n = len(result.records)
    return {"n": n, "seconds": round(time.perf_counter() - start, 1),
            "reply": share(len(replies), n), "declines": share(sum(is_refusal(r["final"]) for r in replies), n),
            "commentary": share(verdicts.count("commentary"), n), "unchanged": share(verdicts.count("unchanged"), n),
            "example_reply": next((" ".join(r["final"].split())[:160] for r in replies), "")}


def safety(model: str, config, sets) -> dict:
    """Harmful compliance and over-refusal of `model`'s greedy answers to the demo's evaluation prompts."""
    loaded = load_model(model, device=config.device, dtype=config.dtype)
    generator = make_generator(loaded, batch_size=config.eval.generation_batch)
    params = SamplingParams(config.eval.response_tokens, 0.0, 1.0, config.eval.subset_seed)
    texts = {name: [r["samples"][0] for r in sample_responses(generator, sets.prompts(name), params, 1,
                                                              progress=False)[0]]
             for name in ("harmless", "over_refusal")}
    compliance, refusal = harmful_compliance(texts["harmless"]), refusal_rate(texts["over_refusal"])
    return {"harmful_compliance": {"share": round(compliance["rate"], 3), "se": round(compliance["stderr"], 3),
                                   "n": compliance["n"]},
            "over_refusal": {"share": round(refusal["rate"], 3), "se": round(refusal["stderr"], 3),
                             "n": refusal["n"]}}


def sft_levers(names: list[str], config, sets, prompts, constitution, generator, work: Path) -> dict:
    """SFT_LEVERS' rows: SL-CAI once (filter off), SFT per lever, the safety figures of each model."""
    out = {}
    for name in names:
        start = time.perf_counter()
        lever = SFT_LEVERS[name]
        if lever is None:
            out[name] = {**safety(config.model, config, sets), "sft_rows": 0}
        else:
            changes = dict(lever)
            sl_config = replace(config.sl_cai, filter=False, helpful_mix=changes.pop("helpful_mix", 0.0))
            data = work / f"sl_cai-{sl_config.helpful_mix:g}"
            result = run_sl_cai(generator, constitution, prompts, sl_config, out_dir=data,
                                helpful=helpful_prompts(replace(config, sl_cai=sl_config), sets), progress=False)
            sft = replace(config.sft, model=config.model, data=str(data), out=str(work / f"sft-{name}"),
                          device=config.device, dtype=config.dtype, **changes)
            train_sft(sft, progress=False)
            out[name] = {**safety(sft.out, config, sets), "sft_rows": len(result.sft_messages)}
        out[name]["seconds"] = round(time.perf_counter() - start, 1)
        figures = out[name]
        print(f"{name:<16} compliance {figures['harmful_compliance']['share']:.3f}±"
              f"{figures['harmful_compliance']['se']:.3f}  over-refusal {figures['over_refusal']['share']:.3f}±"
              f"{figures['over_refusal']['se']:.3f}  rows {figures['sft_rows']:>3}  {figures['seconds']} s", flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default=";".join(LEVERS),
                        help="names of LEVERS, separated by ';' (names hold commas)")
    parser.add_argument("--sft", default="", help="names of SFT_LEVERS, separated by ';': the SFT table instead")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--json", default=None)
    parser.add_argument("--records", type=Path, default=None, help="JSONL: every lever's final revisions and verdicts")
    args = parser.parse_args(argv)
    config, _ = load_pipeline_config("demo")
    sets = load_eval_sets(config.eval)
    prompts = training_prompts(config, sets)[: args.n]
    constitution = load_constitution(config.constitution)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    generator = make_generator(loaded, batch_size=config.sl_cai.batch_size)
    out = {"model": config.model, "dtype": str(loaded.model.dtype), "levers": {}}
    names, known = (args.sft, SFT_LEVERS) if args.sft else (args.levers, LEVERS)
    names = names.split(";")
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown levers {unknown}; known: {'; '.join(known)}")
    if args.sft:
        with tempfile.TemporaryDirectory() as work:
            out["sft"] = sft_levers(names, config, sets, prompts, constitution, generator, Path(work))
    else:
        print(f"{'lever':<22} {'reply':>13} {'declines':>13} {'commentary':>13} {'unchanged':>13} {'s':>6}",
              flush=True)
        for name in names:
            figures = out["levers"][name] = measure(generator, *with_lever(constitution, config.sl_cai, LEVERS[name]),
                                                    prompts, args.records, name)
            cells = " ".join(f"{figures[k]['share']:>6.3f}±{figures[k]['se']:.3f}"
                             for k in ("reply", "declines", "commentary", "unchanged"))
            print(f"{name:<22} {cells} {figures['seconds']:>6}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
