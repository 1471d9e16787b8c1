"""Each decoder family on the cached engine against the plain generator, and the generic runner
against the fused one on the default model, measured in one run (compare ratios, never absolute times).

    python benches/bench_families.py [--families qwen3,gemma2,...] [--n 8] [--tokens 24] [--json FILE]

For every family of tests/helpers/families.py, a small random model of it (--hidden, --layers, the
tiny BPE tokenizer; windows and caps as the tests set them) runs two workloads with the cached
engine (the runner `auto` picks) and with the plain generator (transformers generate, batched):
  sl_cai  SL-CAI, 2 rounds, 3 few-shot examples, greedy, --tokens new tokens a step, --n prompts;
  judge   4 principles in both orders over --pairs pairs (the ConstitutionalJudge's labels).
Then on the default model (--dtype, default auto) the SL-CAI workload through runner "fast" and
runner "generic": the fused path's speed-up over the model's own forward on the same engine.
Random models rarely end a turn, so every step runs to --tokens: the work is the same on both sides.
Times are CPU seconds of this process (see `seconds`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import torch  # noqa: E402
from helpers.families import FAMILIES, tiny_family  # noqa: E402
from helpers.tiny import _train_tokenizer  # noqa: E402

from cai_fast.data import load_prompts  # noqa: E402
from cai_fast.data.constitution import load_constitution  # noqa: E402
from cai_fast.engine import DEFAULT_MODEL, LoadedModel, load_model, make_generator  # noqa: E402
from cai_fast.engine.cached import CachedGenerator, EngineConfig  # noqa: E402
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig  # noqa: E402
from cai_fast.sl_cai import SLCAIConfig, run_sl_cai  # noqa: E402


def seconds(fn) -> float:
    """This process's CPU seconds in fn(): steadier than wall time on a shared machine, since the
    time other jobs hold the cores is left out (both sides use the same threads)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def sl_cai_seconds(generator, prompts, tokens: int) -> float:
    config = SLCAIConfig(rounds=2, few_shot=3, batch_size=len(prompts), temperature=0.0, answer_tokens=tokens,
                         critique_tokens=tokens, revision_tokens=tokens, filter=False)
    return seconds(lambda: run_sl_cai(generator, load_constitution("default"), prompts, config, progress=False))


def judge_seconds(generator, prompts, pairs: int) -> float:
    texts = [p.text for p in prompts][:pairs]
    a = [f"Sure. {t} Here is how, step by step." for t in texts]
    b = [f"I can't help with that, but here is a safer option about: {t}" for t in texts]
    judge = ConstitutionalJudge(generator, "default", JudgeConfig(principles=4, batch_size=16))
    return seconds(lambda: judge.score(texts, a, b))


def family_figures(family: str, tokenizer, prompts, args) -> dict:
    model = tiny_family(family, tokenizer, hidden=args.hidden, layers=args.layers)
    loaded = LoadedModel(model, tokenizer, family)
    out = {}
    for workload, run in (("sl_cai", lambda g: sl_cai_seconds(g, prompts, args.tokens)),
                          ("judge", lambda g: judge_seconds(g, prompts, args.pairs))):
        engine = make_generator(loaded, engine="cached", batch_size=len(prompts))
        plain = make_generator(loaded, engine="plain", batch_size=len(prompts))
        ours, theirs = run(engine), run(plain)
        out[workload] = {"engine_s": round(ours, 2), "plain_s": round(theirs, 2),
                         "speedup": round(theirs / ours, 2), "cache_hit_rate": round(engine.stats.cache_hit_rate, 3)}
    out["runner"] = type(engine.runner).__name__ if isinstance(engine, CachedGenerator) else "plain"
    return out


def runners_on_default(prompts, args) -> dict:
    loaded = load_model(DEFAULT_MODEL, dtype=args.dtype)
    times = {}
    for runner in ("generic", "fast", "generic", "fast"):  # interleaved: the best of two each
        generator = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(max_running=len(prompts),
                                                                                 runner=runner))
        t = sl_cai_seconds(generator, prompts, args.tokens)
        times[runner] = min(times.get(runner, t), t)
    return {"dtype": str(loaded.model.dtype), **{f"{k}_s": round(v, 2) for k, v in times.items()},
            "fast_over_generic": round(times["generic"] / times["fast"], 2)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--prompts", default="red_team")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--skip-default", action="store_true", help="leave out the default model's runners")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    prompts = list(load_prompts(args.prompts, limit=args.n))
    tokenizer = _train_tokenizer()
    out = {"families": {}}
    print(f"{'family':<12} {'runner':<14} {'SL-CAI x plain':>15} {'judge x plain':>14} {'hit rate':>9}")
    for family in args.families.split(","):
        figures = out["families"][family] = family_figures(family, tokenizer, prompts, args)
        print(f"{family:<12} {figures['runner']:<14} {figures['sl_cai']['speedup']:>15} "
              f"{figures['judge']['speedup']:>14} {figures['sl_cai']['cache_hit_rate']:>9}", flush=True)
    if not args.skip_default:
        out["default_model"] = runners_on_default(prompts, args)
        print(f"default model SL-CAI: fast runner {out['default_model']['fast_over_generic']}x the generic one "
              f"({out['default_model']})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
