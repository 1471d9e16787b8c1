"""Batch invariance and label symmetry on the default model, and what they cost.

    python benches/bench_invariance.py [--model M] [--pairs 20] [--alone 5] [--prompts 8] [--json FILE]

Labels: the first --pairs short held-out hh-rlhf pairs (a = the human-preferred answer), judged from
the file as given and from the file with a and b swapped, and --alone of them one at a time; per
dtype (fp32, bf16): the largest |label(a, b) + label(b, a) - 1| (float64) and |alone - in the file|,
and how many are exact. Time: the judge over the pairs (both orders) and SL-CAI on --prompts
red-team prompts (1 round, greedy, 32 tokens a step), bf16, the fastest of --repeats. Run it on
two trees (PYTHONPATH=tree) in turns to compare them in one session: the machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_judge import DATA, hh_pairs  # noqa: E402

from cai_fast.data.constitution import load_constitution  # noqa: E402
from cai_fast.data import load_prompts  # noqa: E402
from cai_fast.engine import DEFAULT_MODEL, load_model, make_generator  # noqa: E402
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig  # noqa: E402
from cai_fast.sl_cai import SLCAIConfig, run_sl_cai  # noqa: E402


def label_symmetry(loaded, pairs, alone: int) -> dict:
    prompts, a, b = (list(x) for x in zip(*pairs))
    judge = ConstitutionalJudge(loaded, "default", JudgeConfig())
    given, swapped = judge.score(prompts, a, b).label.double(), judge.score(prompts, b, a).label.double()
    one = [ConstitutionalJudge(loaded, "default", JudgeConfig()).score([prompts[i]], [a[i]], [b[i]]).label.double()
           for i in range(alone)]
    sums = (given + swapped - 1).abs()
    apart = [(x[0] - given[i]).abs().item() for i, x in enumerate(one)]
    return {"max_sum_minus_1": sums.max().item(), "exact_sums": int((sums == 0).sum()), "pairs": len(pairs),
            "max_alone_vs_file": max(apart), "exact_alone": sum(d == 0 for d in apart), "alone": alone,
            "label_range": [given.min().item(), given.max().item()]}


def fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--alone", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    pairs = hh_pairs(DATA, args.pairs, 600)
    figures = {"labels": {}}
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(args.model, device="cpu", dtype=dtype)
        figures["labels"][dtype] = label_symmetry(loaded, pairs, args.alone)
        print(dtype, figures["labels"][dtype], flush=True)
    prompts, a, b = (list(x) for x in zip(*pairs))
    judge = ConstitutionalJudge(loaded, "default", JudgeConfig())
    figures["judge_seconds"] = fastest(lambda: judge.score(prompts, a, b), args.repeats)
    config = SLCAIConfig(rounds=1, temperature=0.0, answer_tokens=32, critique_tokens=32, revision_tokens=32)
    red_team, constitution = list(load_prompts("red_team", limit=args.prompts)), load_constitution("default")
    figures["kernels"] = make_generator(loaded).stats.kernels  # the engine's kernel record (bf16)
    figures["sl_cai_seconds"] = fastest(lambda: run_sl_cai(make_generator(loaded), constitution, red_team, config,
                                                           progress=False), args.repeats)
    print(f"judge {figures['judge_seconds']:.2f} s, SL-CAI {figures['sl_cai_seconds']:.2f} s (bf16)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
