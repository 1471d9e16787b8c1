"""CPU bench of the fused ops against the unfused torch they replace (issue 4, "Measured").

Cases (fp32, as the default model runs on CPU):
  sft-smollm2         SFT loss forward + backward, 8,192 tokens, V 49,152, H 576
  sft-llama3-8b-head  the same at V 128,256, H 4,096 with 1,024 tokens (the weight alone is
                      2.1 GB and its gradient another 2.1 GB: more tokens do not fit beside
                      the unfused loss on a 24 GiB machine shared with others)
  judge-smollm2       swapped-pair scoring of 4,096 rows (512 pairs × 4 principles × 2 orders)
  ppo-logprobs-smollm2  token log-probs forward + backward, 4,096 tokens (PPO / DPO)

The unfused SFT loss is what transformers computes: logits = h @ Wᵀ, upcast, F.cross_entropy.
The unfused judge is the full-vocabulary log-softmax then the two options renormalised.

Peak memory: each variant runs once in a fresh subprocess that allocates the inputs (in place,
so that making them leaves no higher peak), reads its peak RSS (ru_maxrss), runs, and reads it
again; the difference is the variant's extra peak memory. It includes the [V, H] weight gradient
that both SFT variants must produce, so the table also shows it without that gradient (the loss's
own memory). Time: one more subprocess runs the two variants alternately on the same inputs, so
that both share the machine's noise; the table gives the best and the median, and the ratio of
the bests (the least disturbed by other load). Both variants must compute the same value.

    python benches/bench_ops_cpu.py                          # every case, 3 timed runs each
    python benches/bench_ops_cpu.py --case sft-llama3-8b-head --chunk-rows 512
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import cai_fast.ops as ops

CASES = {
    "sft-smollm2": dict(kind="sft", rows=8192, hidden=576, vocab=49152),
    "sft-llama3-8b-head": dict(kind="sft", rows=1024, hidden=4096, vocab=128256),
    "judge-smollm2": dict(kind="judge", rows=4096, hidden=576, vocab=49152),
    "ppo-logprobs-smollm2": dict(kind="logprobs", rows=4096, hidden=576, vocab=49152),
}
PRINCIPLES = 4
OPTION_IDS = (330, 389)


def _inputs(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H] and targets, made in place (no transient copies)."""
    torch.manual_seed(0)
    hidden = torch.empty(case["rows"], case["hidden"]).normal_()
    weight = torch.empty(case["vocab"], case["hidden"]).normal_(std=2.0 / case["hidden"] ** 0.5)
    targets = torch.randint(0, case["vocab"], (case["rows"],))
    return hidden, weight, targets


def _sft(variant, hidden, weight, targets):
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    if variant == "fused":
        loss = ops.fused_linear_cross_entropy(hidden, weight, targets)
    else:
        loss = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-100)
    loss.backward()
    return loss.item()


def _logprobs(variant, hidden, weight, targets):
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    call = ops.linear_logprobs if variant == "fused" else ops.linear_logprobs_reference
    logp = call(hidden, weight, targets)
    logp.sum().backward()
    return logp.sum().item()


def _judge(variant, hidden, weight, _targets):
    pairs = hidden.reshape(-1, PRINCIPLES, 2, hidden.shape[1])
    call = ops.swapped_pair_scores if variant == "fused" else ops.swapped_pair_scores_reference
    with torch.no_grad():
        return call(pairs, weight, OPTION_IDS).label_mean.sum().item()


KINDS = {"sft": _sft, "logprobs": _logprobs, "judge": _judge}


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _run(case: dict, variant: str, hidden, weight, targets, chunk_rows: int | None) -> float:
    hidden.grad = weight.grad = None
    with ops.use_path("torch", chunk_rows=chunk_rows):
        return KINDS[case["kind"]](variant, hidden, weight, targets)


def memory_worker(case_name: str, variant: str, chunk_rows: int | None) -> dict:
    """Extra peak RSS of one run of the variant, in this fresh process."""
    case = CASES[case_name]
    hidden, weight, targets = _inputs(case)
    torch.ones(64, 64) @ torch.ones(64, 64)  # load the BLAS before the baseline
    before = _peak_bytes()
    value = _run(case, variant, hidden, weight, targets, chunk_rows)
    return dict(extra_peak=_peak_bytes() - before, value=value)


def timing_worker(case_name: str, runs: int, chunk_rows: int | None) -> dict:
    """Seconds of each run, the variants alternating on the same inputs in this process."""
    case = CASES[case_name]
    inputs = _inputs(case)
    seconds = {"unfused": [], "fused": []}
    for _ in range(runs):
        for variant, times in seconds.items():
            start = time.perf_counter()
            _run(case, variant, *inputs, chunk_rows)
            times.append(time.perf_counter() - start)
    return seconds


def _in_subprocess(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *map(str, args)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(case_name: str, runs: int, chunk_rows: int | None) -> dict:
    """Peak memory (a fresh process per variant) and times (one process, alternating)."""
    results = {v: _in_subprocess("memory", case_name, v, chunk_rows) for v in ("unfused", "fused")}
    for variant, times in _in_subprocess("time", case_name, runs, chunk_rows).items():
        results[variant].update(best=min(times), median=statistics.median(times))
    return results


def report(case_name: str, results: dict) -> str:
    case = CASES[case_name]
    unfused, fused = results["unfused"], results["fused"]
    grad_gib = 4 * case["vocab"] * case["hidden"] / 2**30 if case["kind"] != "judge" else 0.0

    def gib(m, without_grad=False):
        return max(m["extra_peak"] / 2**30 - (grad_gib if without_grad else 0.0), 0.0)

    agree = abs(fused["value"] - unfused["value"]) <= 1e-3 * max(1.0, abs(unfused["value"]))
    cells = [case_name, case["rows"], f"{unfused['best']:.3g} / {unfused['median']:.3g}",
             f"{fused['best']:.3g} / {fused['median']:.3g}", f"{fused['best'] / unfused['best']:.3g}",
             f"{gib(unfused):.3f}", f"{gib(fused):.3f}", f"{gib(fused) / gib(unfused):.3f}",
             f"{gib(unfused, True):.3f}", f"{gib(fused, True):.3f}",
             f"{gib(fused, True) / max(gib(unfused, True), 1e-9):.3f}", "yes" if agree else "NO"]
    return "| " + " | ".join(map(str, cells)) + " |"


HEADER = ("| case | rows | unfused s best / median | fused s best / median | time ratio (best) | "
          "unfused peak GiB | fused peak GiB | peak ratio | unfused GiB w/o dW | fused GiB w/o dW | "
          "ratio w/o dW | same value |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=list(CASES), action="append",
                        help="case to run (repeatable); default: all")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each variant (default 3)")
    parser.add_argument("--chunk-rows", type=int, help="force the rows per tile of the fused path")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, case_name, arg, chunk_rows = args.worker
        chunk_rows = None if chunk_rows == "None" else int(chunk_rows)
        work = memory_worker(case_name, arg, chunk_rows) if kind == "memory" else \
            timing_worker(case_name, int(arg), chunk_rows)
        print(json.dumps(work))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times: best and median "
          f"of {args.runs} alternating runs in one process; peak: one run in a fresh process")
    print(HEADER)
    for case_name in args.case or CASES:
        print(report(case_name, measure(case_name, args.runs, args.chunk_rows)), flush=True)


if __name__ == "__main__":
    main()
