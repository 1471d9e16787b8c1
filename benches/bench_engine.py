"""The cached engine against transformers, measured in one run (compare ratios, never absolute times).

    python benches/bench_engine.py [--sections sl_cai,judge,decode,divergence] [--json FILE]

Sections (each prints its table; --json writes every figure):
  sl_cai      SL-CAI (2 rounds, 3 few-shot examples, greedy, --tokens new tokens a step) on the same
              --compare-n prompts: the engine vs (a) the plain one-at-a-time baseline
              (baseline_sl_cai.py) and (b) batched transformers generate without prefix sharing
              (the plain generator, --plain-batch prompts a call); then the engine alone on --n
              prompts. Prefill tokens submitted / computed, cache hit rate, time in the scheduler
              and in the model, and how many traces are identical across the three.
  judge       RLAIF labelling: --samples samples per prompt (engine, temperature 0.8), all pairs,
              4 principles in both orders. Prompt tokens submitted / computed by the scheduler over
              the --n prompts (a dry run of the scheduler alone, checked against the real engine on
              --judge-pairs pairs), then labels/s of the engine, of the plain generator (both
              orders, batched) and of the trl-style baseline (baseline_judge.py: one order, one
              generate call per pair and principle), with the tokens each computes; and the
              scheduler's own time over the whole workload, C++ and its Python twin.
  decode      decode tokens/s at batch 1 and --decode-batch, engine vs transformers' generate (per
              step, prefill excluded), against the roofline measured in the same run: what a step
              must read (the weights once, each request's K/V) at the bandwidth measured over a
              buffer of that size (the faster of a sum and the AMX linear streaming it: a 269 MB
              model fits this CPU's 300 MiB L3), or the rate of a big matmul (2 × parameters flops
              a token), and, steadier, against the same bytes at the rate over 1 GB (DRAM); plus
              decode after the 3-example few-shot block: the engine at --decode-batch with cascade
              attention on and off (the shared prefix read once a step, or once per request),
              generate at batch 8. Best of --repeats interleaved runs.
  divergence  greedy completions of --n chat prompts, engine (all in one batch) vs generate (one
              prompt at a time): how many differ, and the top-2 logit gap where they part.
  levers      decode tokens/s at batch 1 and --decode-batch of each engine lever taken in turn: fp32
              with the model's modules and per-head attention (the engine before issue 10), bf16,
              torch's fused CPU flash attention, fused prepacked projections, the C++ decode
              attention and row kernels, the AMX linear, the C++ layer loop (the default), and with
              --compile the compiled decode step (inductor; compiles first, minutes). Best of
              --repeats interleaved runs, against the roofline of each lever's dtype.

The model runs in --dtype (default auto: bf16 on this AMX CPU); the ceilings are measured in it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import torch  # noqa: E402
from baseline_judge import baseline_judge  # noqa: E402
from baseline_sl_cai import baseline_sl_cai  # noqa: E402
from helpers.engine import as_sequence, reference_greedy, top2_gap  # noqa: E402

from cai_fast.data import prompts as P  # noqa: E402
from cai_fast.data.constitution import load_constitution  # noqa: E402
from cai_fast.data import load_prompts  # noqa: E402
from cai_fast.engine import DEFAULT_MODEL, SamplingParams, linear, load_model, make_generator  # noqa: E402
from cai_fast.engine.cached import CachedGenerator, EngineConfig  # noqa: E402
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig  # noqa: E402
from cai_fast.scheduler import make_cache, make_scheduler  # noqa: E402
from cai_fast.sl_cai import SLCAIConfig, run_sl_cai  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_timed(fn) -> tuple[dict, object]:
    """Wall seconds and this process's CPU seconds of fn(). With one thread, CPU time leaves out
    the time other jobs on the shared machine hold the cores, so ratios of it are steadier."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return {"seconds": round(time.perf_counter() - wall, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}, out


def speedups(out: dict, ours: str, per: str, **others: str) -> None:
    """out[f"speedup_vs_{name}"] in wall and CPU time, from `per`-items a second of each side."""
    for name, key in others.items():
        for clock in ("seconds", "cpu_seconds"):
            rate = lambda side: out[side][per] / out[side][clock]  # noqa: E731
            out[f"{'cpu_' if clock == 'cpu_seconds' else ''}speedup_vs_{name}"] = rate(ours) / rate(key)


def engine(loaded, batch: int, **config) -> CachedGenerator:
    return CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(max_running=batch, **config))


# ---------------------------------------------------------------- SL-CAI


def trace(record: dict) -> list[str]:
    return [record["initial"]] + [t for r in record["rounds"] for t in (r["critique"], r["revision"])]


def sl_cai(loaded, args) -> dict:
    constitution = load_constitution("default")
    prompts = list(load_prompts(args.prompts, limit=args.n))
    subset = prompts[: args.compare_n]

    def config(batch):
        return SLCAIConfig(rounds=2, few_shot=3, batch_size=batch, temperature=0.0, answer_tokens=args.tokens,
                           critique_tokens=args.tokens, revision_tokens=args.tokens)

    def run(generator, items, batch):
        clocks, result = cpu_timed(lambda: run_sl_cai(generator, constitution, items, config(batch), progress=False))
        figures = {"prompts": len(items), **clocks, "prompts_per_s": len(items) / clocks["seconds"],
                   "generated_tokens": generator.stats.generated_tokens, "prompt_tokens": generator.stats.prompt_tokens}
        if isinstance(generator, CachedGenerator):
            figures.update(generator.stats.summary())
        return figures, {r["prompt_id"]: trace(r) for r in result.records}

    out = {"tokens_per_step": args.tokens, "rounds": 2, "few_shot": 3}
    out["engine"], ours = run(make_generator(loaded, engine="cached", batch_size=len(subset)), subset, len(subset))
    out["plain"], plain = run(make_generator(loaded, engine="plain", batch_size=args.plain_batch), subset,
                              args.plain_batch)
    cfg = config(1)
    clocks, (records, tokens) = cpu_timed(lambda: baseline_sl_cai(
        loaded.model, loaded.tokenizer, constitution, subset, rounds=2, seed=cfg.seed, few_shot=3,
        answer_tokens=args.tokens, critique_tokens=args.tokens, revision_tokens=args.tokens))
    out["baseline"] = {"prompts": len(subset), **clocks, "prompts_per_s": len(subset) / clocks["seconds"],
                       "generated_tokens": tokens}
    base = {r["prompt_id"]: trace(r) for r in records}
    out["identical_traces"] = {"engine_vs_plain": sum(ours[k] == plain[k] for k in ours),
                               "engine_vs_baseline": sum(ours[k] == base[k] for k in ours), "of": len(ours)}
    speedups(out, "engine", "prompts", baseline="baseline", plain="plain")
    if args.n > args.compare_n:
        out["engine_all"], _ = run(make_generator(loaded, engine="cached", batch_size=32), prompts, 32)  # no ratio:
        # the other sides ran --compare-n prompts, a different workload
    return out


# ---------------------------------------------------------------- judge


def judge_rows(judge: ConstitutionalJudge, pairs) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of every judge prompt (both orders) and of the baseline's (one order)."""
    both, single = [], []
    for prompt, a, b in pairs:
        conversation = P.conversation_text(prompt)
        principles = judge.principles_for(conversation, a, b)
        for order, (first, second) in enumerate(((a, b), (b, a))):
            for principle in principles:
                ids = P.render_continuation(judge.tokenizer, judge.judge_chat(conversation, first, second, principle),
                                            judge.options.prefix)
                both.append(ids)
                if order == 0:
                    single.append(ids)
    return both, single


def dry_run(rows: list[list[int]], config: EngineConfig, backend: str = "cpp") -> tuple[int, float]:
    """Prefill tokens the engine computes for these scoring rows, and the seconds the scheduler
    takes: the scheduler alone, driven as the engine drives it (each batch is prefilled and
    finished before the next is scheduled)."""
    total = sum(len(r) for r in rows)
    cache = make_cache(total // config.block_size + len(rows) + 1, config.block_size, backend)
    scheduler = make_scheduler(cache, config.prefill_tokens, config.policy, config.dedup_min_tokens)
    start, computed = time.perf_counter(), 0
    for i, row in enumerate(rows):
        scheduler.add(i, row, 0, len(row) - 1)
    while scheduler.num_waiting:
        for s in scheduler.schedule(config.max_running).scheduled:
            computed += len(s.tokens_to_compute)
            scheduler.finish(s.request_id, rows[s.request_id])
    return computed, time.perf_counter() - start


def sample_pairs(generator, tokenizer, prompts, samples: int, tokens: int) -> list[tuple]:
    """(prompt text, a, b) for every pair of distinct non-empty samples of each prompt."""
    ids = [P.render(tokenizer, [P.user(p.text)]) for p in prompts for _ in range(samples)]
    texts = [c.text for c in generator.generate(ids, SamplingParams(tokens, temperature=0.8, top_p=0.95, seed=1))]
    pairs = []
    for k, prompt in enumerate(prompts):
        mine = texts[k * samples : (k + 1) * samples]
        pairs += [(prompt.text, a, b) for a, b in itertools.combinations(mine, 2)
                  if a.strip() and b.strip() and a != b]
    return pairs


def judge(loaded, args) -> dict:
    prompts = list(load_prompts(args.prompts, limit=args.n))
    sampler = engine(loaded, 32)
    seconds, pairs = timed(lambda: sample_pairs(sampler, loaded.tokenizer, prompts, args.samples, args.tokens))
    out = {"prompts": len(prompts), "samples": args.samples, "sample_tokens": args.tokens, "pairs": len(pairs),
           "sampling_seconds": round(seconds, 1), "principles": 4, "judge_few_shot": args.judge_few_shot}
    config = JudgeConfig(principles=4, few_shot=args.judge_few_shot, batch_size=16)
    ours = engine(loaded, 32)
    judge_engine = ConstitutionalJudge(ours, "default", config)
    both, single = judge_rows(judge_engine, pairs)
    (computed, cpp_s), (_, python_s) = (dry_run(both, ours.config, backend) for backend in ("cpp", "python"))
    out["all_prompts"] = {"judge_prompts": len(both), "submitted": sum(map(len, both)), "computed": computed,
                          "baseline_tokens": sum(map(len, single)),
                          "scheduler_seconds": {"cpp": round(cpp_s, 3), "python": round(python_s, 3)}}
    out["all_prompts"]["hit_rate"] = 1 - out["all_prompts"]["computed"] / out["all_prompts"]["submitted"]
    subset = pairs[: args.judge_pairs]
    sub_both, sub_single = judge_rows(judge_engine, subset)
    columns = [list(c) for c in zip(*subset)]
    clocks, _ = cpu_timed(lambda: judge_engine.score(*columns))
    stats = ours.stats
    out["engine"] = {"pairs": len(subset), **clocks, "submitted": stats.prefill_submitted, "computed": stats.prefill_computed,
                     "dry_run_computed": dry_run(sub_both, ours.config)[0],
                     "scheduler_ms_per_batch": stats.summary()["scheduler_ms_per_batch"],
                     "model_seconds": round(stats.model_seconds, 1)}
    plain = ConstitutionalJudge(make_generator(loaded, engine="plain", batch_size=16), "default", config)
    clocks, _ = cpu_timed(lambda: plain.score(*columns))
    out["plain"] = {"pairs": len(subset), **clocks, "computed": sum(map(len, sub_both)), "orders": 2}
    clocks, _ = cpu_timed(lambda: baseline_judge(loaded.model, loaded.tokenizer, judge_engine, subset))
    out["baseline"] = {"pairs": len(subset), **clocks, "computed": sum(map(len, sub_single)), "orders": 1}
    for side in ("engine", "plain", "baseline"):
        out[side]["labels_per_s"] = len(subset) / out[side]["seconds"]
    speedups(out, "engine", "pairs", baseline="baseline", plain="plain")
    return out


# ---------------------------------------------------------------- decode


@functools.lru_cache(maxsize=None)
def read_gb_s(megabytes: int) -> float:
    """This CPU's bandwidth reading a buffer of `megabytes` again and again, as decode steps read the
    weights and K/V: the fastest of 10 passes of torch's sum over it (fp32) and, on an AMX CPU, of
    the AMX linear streaming it as a [n, 576] bf16 weight at one row. A buffer that fits the
    last-level cache (300 MiB on this machine's CPU) reads at the cache's rate, not DRAM's: a
    roofline must use the rate at the size the step reads. That rate swings from run to run
    (34-67 GB/s at 270 MB here: the L3 is shared with the host's other machines)."""
    src = torch.randn(megabytes * 250_000)
    best = src.numel() * 4 / min(timed(src.sum)[0] for _ in range(10))
    del src
    if linear.HAVE_AMX:
        packed = linear.pack(torch.randn(megabytes * 1_000_000 // 2 // 576 // 32 * 32, 576).bfloat16())
        x = torch.randn(1, 576).bfloat16()
        best = max(best, packed.numel() * 2 / min(timed(lambda: linear.linear(x, packed))[0] for _ in range(10)))
    return best / 1e9


def ceilings(model) -> dict:
    """What `roofline` needs, measured in the model's dtype: the weights' bytes, a token's K/V bytes
    over all layers, the matmul rate (2048³) and the matmul ceiling (2 × parameters flops a token);
    with the bandwidth over the weights' size and over 1 GB (beyond the caches) for reference."""
    big = torch.randn(2048, 2048).to(model.dtype)
    flops = 2 * 2048**3 / min(timed(lambda: big @ big)[0] for _ in range(3))
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * big.element_size()
    weights_gb_s = read_gb_s(buffer_mb(weight_bytes / 1e6))
    return {"weights_read_gb_s": weights_gb_s, "dram_read_gb_s": read_gb_s(1000),
            "matmul_gflop_s": flops / 1e9, "weight_mb": weight_bytes / 1e6,
            "kv_bytes_per_token": kv_bytes, "batch1_ceiling_tok_s": weights_gb_s * 1e9 / weight_bytes,
            "matmul_ceiling_tok_s": flops / (2 * params)}


class StepClock:
    """A logits processor that only notes when each generation step happens."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate_decode_rate(loaded, prompts: list[list[int]], tokens: int) -> float:
    """transformers generate: decode tokens/s over steps 2..tokens (prefill excluded)."""
    from transformers import LogitsProcessorList

    tok = loaded.tokenizer
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    clock = StepClock()
    with torch.inference_mode():
        loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                              top_k=None, logits_processor=LogitsProcessorList([clock]))
    return len(prompts) * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def engine_decode_rate(loaded, prompts: list[list[int]], tokens: int, cascade: bool = True, **config) -> float:
    """The engine's decode tokens/s (wall time of its decode steps) over `tokens` new tokens each;
    cascade=False attends to the shared prefix per request instead of once for the batch."""
    generator = engine(loaded, len(prompts), **config)
    generator.stop_ids = set()  # run every sequence to `tokens`, as min_new_tokens does for generate
    if not cascade:
        generator.runner.attention._shared_tokens = lambda batch: 0
    generator.generate(prompts, SamplingParams(tokens))
    return generator.stats.decode_tokens / generator.stats.decode_seconds


def best_of(repeats: int, **rates) -> dict:
    """Each rate function run `repeats` times, interleaved; the best of each (the machine is shared)."""
    runs = {name: [] for name in rates}
    for _ in range(repeats):
        for name, rate in rates.items():
            runs[name].append(rate())
    return {name: max(values) for name, values in runs.items()}


def decode(loaded, args) -> dict:
    tok = loaded.tokenizer
    red_team = list(load_prompts(args.prompts, limit=args.decode_batch))
    chats = [P.render(tok, [P.user(p.text)]) for p in red_team]
    few_shot = P.few_shot_messages(load_constitution("default"), 3)
    long = [P.render(tok, few_shot + [P.user(p.text)]) for p in red_team]
    out = {"tokens": args.tokens, "threads": torch.get_num_threads(), "repeats": args.repeats, **ceilings(loaded.model)}
    for batch in (1, args.decode_batch):
        rates = best_of(args.repeats, engine=lambda: engine_decode_rate(loaded, chats[:batch], args.tokens),
                        generate=lambda: generate_decode_rate(loaded, chats[:batch], args.tokens))
        out[f"batch{batch}"] = {"engine_tok_s": rates["engine"], "generate_tok_s": rates["generate"],
                                "ratio": rates["engine"] / rates["generate"],
                                "prompt_tokens_mean": sum(map(len, chats[:batch])) / batch}
    rates = best_of(args.repeats, cascade=lambda: engine_decode_rate(loaded, long, args.tokens),
                    per_request=lambda: engine_decode_rate(loaded, long, args.tokens, cascade=False),
                    generate_batch8=lambda: generate_decode_rate(loaded, long[:8], args.tokens))
    out["few_shot_context"] = {"batch": len(long), "prompt_tokens_mean": sum(map(len, long)) / len(long),
                               **{f"engine_tok_s_{k}": v for k, v in rates.items() if k != "generate_batch8"},
                               "generate_tok_s_batch8": rates["generate_batch8"]}
    for batch in (1, args.decode_batch):
        row = out[f"batch{batch}"]
        context = decode_context(chats[:batch], args.tokens)
        row["step_mb"] = step_mb(out, batch, context)
        row["step_read_gb_s"] = read_gb_s(row["step_mb"])
        row["roofline_tok_s"] = roofline(out, batch, context)
        row["of_roofline"] = row["engine_tok_s"] / row["roofline_tok_s"]
        row["of_dram_roofline"] = row["engine_tok_s"] * row["step_mb"] / (batch * out["dram_read_gb_s"] * 1e3)
    return out


def levers(loaded, args) -> dict:
    """Decode tokens/s with each lever of issue 10 taken in turn (see the module docstring)."""
    from cai_fast.engine.attention import reference as attention

    fp32 = load_model(args.model, dtype="float32")
    bf16 = loaded if loaded.model.dtype == torch.bfloat16 else load_model(args.model, dtype="bfloat16")
    chats = [P.render(bf16.tokenizer, [P.user(p.text)]) for p in load_prompts(args.prompts, limit=args.decode_batch)]

    def rate(model, batch, reference_attention=False, **config):
        def run():
            attention.HAVE_CPU_FLASH = not reference_attention
            try:
                return engine_decode_rate(model, chats[:batch], args.tokens, **config)
            finally:
                attention.HAVE_CPU_FLASH = True
        return run

    out = {"tokens": args.tokens, "fp32": ceilings(fp32.model), "bf16": ceilings(bf16.model)}
    for batch in (1, args.decode_batch):
        steps = {"fp32 modules, per-head attention": rate(fp32, batch, True, fused=False, attention="torch"),
                 "bf16 modules, per-head attention": rate(bf16, batch, True, fused=False, attention="torch"),
                 "bf16 + torch's flash attention": rate(bf16, batch, fused=False, attention="torch"),
                 "bf16 + fused prepacked projections": rate(bf16, batch, attention="torch", linear="onednn"),
                 "bf16 + C++ decode attention and row kernels": rate(bf16, batch, linear="onednn"),
                 "bf16 + AMX linear": rate(bf16, batch, decode_loop="python"),
                 "bf16 + C++ decode layer loop (default)": rate(bf16, batch)}
        if args.compile:
            compiled = engine(bf16, batch, compile="inductor")
            out[f"compile_seconds_batch{batch}"] = timed(lambda: compiled.generate(chats[:batch], SamplingParams(2)))[0]
            steps["bf16 + compiled decode step (inductor)"] = rate(bf16, batch, compile="inductor")
        rates = best_of(args.repeats, **steps)
        context = decode_context(chats[:batch], args.tokens)
        ceiling = {name: out["fp32" if "fp32" in name else "bf16"] for name in rates}
        out[f"batch{batch}"] = {name: {"tok_s": r, "of_roofline": r / roofline(ceiling[name], batch, context)}
                                for name, r in rates.items()}
    return out


def roofline(ceiling: dict, batch: int, context: float) -> float:
    """Decode tokens/s a batch can reach: what a step must read (the weights once, and each request's
    K/V over `context` tokens on average) at the bandwidth measured over that many bytes, or the
    matmul rate."""
    megabytes = step_mb(ceiling, batch, context)
    return min(ceiling["matmul_ceiling_tok_s"], batch * read_gb_s(megabytes) * 1e3 / megabytes)


def step_mb(ceiling: dict, batch: int, context: float) -> int:
    """Megabytes a decode step reads: the weights and `batch` requests' K/V over `context` tokens."""
    return buffer_mb(ceiling["weight_mb"] + batch * context * ceiling["kv_bytes_per_token"] / 1e6)


def buffer_mb(megabytes: float) -> int:
    """`megabytes` rounded up to 8 MB: sizes a few MB apart share one `read_gb_s` measurement."""
    return 8 * math.ceil(megabytes / 8)


def decode_context(prompts: list[list[int]], tokens: int) -> float:
    """Keys a request attends to, on average over the decode steps 2..tokens that are timed."""
    return sum(map(len, prompts)) / len(prompts) + (tokens + 1) / 2


# ---------------------------------------------------------------- divergence


def divergence(loaded, args) -> dict:
    chats = [P.render(loaded.tokenizer, [P.user(p.text)]) for p in load_prompts(args.prompts, limit=args.n)]
    ours = engine(loaded, len(chats)).generate(chats, SamplingParams(args.tokens))
    parted = []
    for prompt, completion in zip(chats, ours):
        a, b = as_sequence(completion), reference_greedy(loaded, prompt, args.tokens)
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is None and len(a) != len(b):
            step = min(len(a), len(b))
        if step is not None:
            parted.append({"step": step, "top2_gap": top2_gap(loaded.model, prompt + b[:step])})
    steps = sum(len(as_sequence(c)) for c in ours)
    return {"prompts": len(chats), "tokens": args.tokens, "greedy_steps": steps, "differing": len(parted),
            "where": parted}


# ---------------------------------------------------------------- main

SECTIONS = {"sl_cai": sl_cai, "judge": judge, "decode": decode, "divergence": divergence, "levers": levers}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--compile", action="store_true", help="levers: also the compiled decode step")
    parser.add_argument("--prompts", default="red_team")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--n", type=int, default=32, help="prompts of the workload")
    parser.add_argument("--compare-n", type=int, default=8, help="SL-CAI prompts the three sides share")
    parser.add_argument("--plain-batch", type=int, default=8, help="prompts a plain generate call")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens a step / sample")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--judge-pairs", type=int, default=8, help="pairs timed on each judge side")
    parser.add_argument("--judge-few-shot", type=int, default=0, help="judge few-shot examples (JudgeConfig)")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="decode measurements, best of")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    return parser


def warm_up(loaded) -> None:
    """One short generation through each side before any timing, so that no side pays torch's
    one-off costs (first kernels, thread pool, allocator growth) inside its measurement."""
    chats = [P.render(loaded.tokenizer, [P.user(text)]) for text in ("Say hello.", "Name three colours.")]
    for kind in ("cached", "plain"):
        make_generator(loaded, engine=kind, batch_size=2).generate(chats, SamplingParams(4))
    reference_greedy(loaded, chats[0], 4)


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    random.seed(args.seed)
    loaded = load_model(args.model, dtype=args.dtype)
    warm_up(loaded)
    figures = {"model": args.model, "dtype": str(loaded.model.dtype), "threads": torch.get_num_threads()}
    for name in args.sections.split(","):
        figures[name] = SECTIONS[name](loaded, args)
        print(json.dumps({name: figures[name]}, indent=1, default=float), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    return figures


if __name__ == "__main__":
    main()
