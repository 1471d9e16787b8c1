"""SL-CAI throughput: the package against the plain baseline, on the same prompts, in one run.

    python benches/bench_sl_cai.py [--model M] [--prompts red_team] [--n 8] [--rounds 1]

Both sides decode greedily with the same templates, principles and token limits. Prints
prompts/s and generated tokens/s of each, and the ratios (the machines are noisy: compare the
ratio, never an absolute time). With --json FILE the figures are also written there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_sl_cai import baseline_sl_cai  # noqa: E402

from cai_fast.data.constitution import load_constitution  # noqa: E402
from cai_fast.data import load_prompts  # noqa: E402
from cai_fast.engine import DEFAULT_MODEL, load_model, make_generator  # noqa: E402
from cai_fast.sl_cai import SLCAIConfig, run_sl_cai  # noqa: E402


def measure(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompts", default="red_team")
    parser.add_argument("--n", type=int, default=8, help="number of prompts")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens of every step")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, dtype="float32")
    constitution = load_constitution("default")
    prompts = list(load_prompts(args.prompts, limit=args.n))
    config = SLCAIConfig(rounds=args.rounds, batch_size=args.batch_size, temperature=0.0,
                         answer_tokens=args.tokens, critique_tokens=args.tokens, revision_tokens=args.tokens)
    base_s, (_, base_tokens) = measure(lambda: baseline_sl_cai(
        loaded.model, loaded.tokenizer, constitution, prompts, rounds=config.rounds, seed=config.seed,
        few_shot=config.few_shot, answer_tokens=args.tokens, critique_tokens=args.tokens,
        revision_tokens=args.tokens))
    generator = make_generator(loaded, batch_size=args.batch_size)
    ours_s, _ = measure(lambda: run_sl_cai(generator, constitution, prompts, config, progress=False))
    ours_tokens = generator.stats.generated_tokens
    figures = {
        "prompts": len(prompts), "rounds": config.rounds, "max_new_tokens": args.tokens,
        "baseline": {"seconds": round(base_s, 2), "prompts_per_s": len(prompts) / base_s,
                     "tokens": base_tokens, "tokens_per_s": base_tokens / base_s},
        "cai_fast": {"seconds": round(ours_s, 2), "prompts_per_s": len(prompts) / ours_s,
                     "tokens": ours_tokens, "tokens_per_s": ours_tokens / ours_s,
                     "prompt_tokens": generator.stats.prompt_tokens,
                     "kernels": getattr(generator.stats, "kernels", None)},  # the engine's kernel record
    }
    figures["ratio_prompts_per_s"] = figures["cai_fast"]["prompts_per_s"] / figures["baseline"]["prompts_per_s"]
    figures["ratio_tokens_per_s"] = figures["cai_fast"]["tokens_per_s"] / figures["baseline"]["tokens_per_s"]
    print_table(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def print_table(f: dict) -> None:
    print(f"\nSL-CAI, {f['prompts']} prompts, {f['rounds']} round(s), <= {f['max_new_tokens']} new tokens a step")
    print(f"{'':<10}{'seconds':>10}{'prompts/s':>12}{'tokens':>9}{'tokens/s':>11}")
    for name in ("baseline", "cai_fast"):
        r = f[name]
        print(f"{name:<10}{r['seconds']:>10.1f}{r['prompts_per_s']:>12.3f}{r['tokens']:>9}{r['tokens_per_s']:>11.1f}")
    print(f"ratio (cai_fast / baseline): prompts/s {f['ratio_prompts_per_s']:.2f}x, "
          f"tokens/s {f['ratio_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
