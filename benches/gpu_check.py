"""The prepared GPU check (issue 14); run it through benches/gpu_check.sh, which installs the
project first. Each check returns its figures and a verdict; the results go to one JSON and one
markdown table in --out, and the process exits 1 naming every failed check. Without CUDA the GPU
checks are skipped (with the reason) and the rest runs, so the script is tested on CPU.

Checks: the build (cai_fast._core, and cai_fast._cuda where a toolkit was found); the CUDA KV
kernels against their torch twin and the Triton paged attention against the torch path
(tests/test_kv_cuda.py, tests/test_engine_paged_kernel.py's cases, on CUDA in bf16 and fp32);
the engine's greedy output against transformers' generate in bf16, cache on and off; the
engine's decode (batch 32) and judge-scoring throughput against the GPU's measured ceilings; one
small pipeline round; benches/gpu_ops.py in bf16 and fp32 (its MISMATCH rows fail the check).
The engine, judge and pipeline run a random-weight model of the default model's shapes (its
config and tokenizer from --shapes-from, weights drawn here): the default model's weights do not
travel to the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' cases and helpers are the check's baselines

NEAR_TIE = 0.1  # logits: a greedy divergence at a step whose top-2 gap is below this is a near tie
CUDA = torch.cuda.is_available()
DEVICE = "cuda"  # where the GPU checks run (a smoke run of this script may point it elsewhere)


class Skip(Exception):
    """A check that cannot run on this machine (the message says why)."""


def needs_cuda() -> None:
    if not CUDA:
        raise Skip("no CUDA device")


# ---------------------------------------------------------------- checks


def check_build(args) -> dict:
    import cai_fast
    from cai_fast.engine.kv import HAVE_CUDA_KERNELS
    from cai_fast.scheduler import HAVE_CORE

    figures = {"package": str(Path(cai_fast.__file__).parent), "core": HAVE_CORE, "cuda_kernels": HAVE_CUDA_KERNELS}
    ok = HAVE_CORE and (HAVE_CUDA_KERNELS or not args.expect_cuda_build)
    return {**figures, "ok": ok}


def check_kv_kernels(args) -> dict:
    needs_cuda()
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "twin",
               "tests/test_kv_cuda.py"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    return {"pytest tests/test_kv_cuda.py -k twin": tail, "ok": done.returncode == 0 and "skipped" not in tail}


def check_paged_attention(args) -> dict:
    needs_cuda()
    from helpers.paged import CASES, both_paths

    worst, tol = {}, {torch.float32: 1e-4, torch.bfloat16: 2e-2}
    for dtype in (torch.float32, torch.bfloat16):
        for case in CASES:
            for splits in (1, 4):
                for got, want in both_paths(case, splits, DEVICE, dtype):
                    err = float((got.float() - want.float()).norm() / want.float().norm())
                    key = str(dtype).removeprefix("torch.")
                    worst[key] = max(worst.get(key, 0.0), err)
    return {"worst relative error": worst, "ok": all(worst[str(d).removeprefix("torch.")] <= t for d, t in tol.items())}


def random_model(shapes_from: Path, folder: Path) -> Path:
    """A model folder: the config and tokenizer of `shapes_from`, random weights (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shapes_from))
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(shapes_from).save_pretrained(folder)
    return folder


def _prompts(tokenizer, n: int, shared_words: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    words = ["harm", "help", "answer", "question", "policy", "safe", "model", "user", "write", "explain"]
    prefix = " ".join(rng.choice(words) for _ in range(shared_words))
    return [tokenizer(prefix + " " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 40))))["input_ids"]
            for _ in range(n)]


def _greedy_reference(loaded, prompt, max_new) -> tuple[list[int], list[float]]:
    """transformers' generate, greedy, alone; the top-2 logit gap of each step."""
    ids = torch.tensor([prompt], device=DEVICE)
    out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids),
                                do_sample=False, max_new_tokens=max_new, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    gaps = [float(s[0].float().topk(2).values.diff().abs()) for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), gaps


def check_engine_greedy(args) -> dict:
    needs_cuda()
    from cai_fast.engine import SamplingParams, load_model
    from cai_fast.engine.cached import CachedGenerator, EngineConfig

    loaded = load_model(str(args.model), dtype="bfloat16", device=DEVICE)
    loaded.model.generation_config.eos_token_id = None  # random weights: run every step, no early end
    prompts, max_new = _prompts(loaded.tokenizer, 16, 120), 24
    reference = [_greedy_reference(loaded, p, max_new) for p in prompts]
    figures = {}
    for cache in (True, False):
        engine = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(prefix_cache=cache, pool_tokens=1 << 16))
        engine.stop_ids = set()  # the random model's end-of-turn draws would end runs early
        got = engine.generate(prompts, SamplingParams(max_new_tokens=max_new, temperature=0.0))
        same = ties = other = 0
        for c, (want, gaps) in zip(got, reference):
            step = next((i for i, (a, b) in enumerate(zip(c.token_ids, want)) if a != b), None)
            if step is None:
                same += 1
            elif gaps[step] < NEAR_TIE:
                ties += 1
            else:
                other += 1
        figures[f"cache {'on' if cache else 'off'}"] = {"equal": same, "near-tie divergences": ties, "other": other,
                                                        "kernels": engine.runner.kernels.as_dict()}
    return {**figures, "ok": all(f["other"] == 0 for f in figures.values())}


def _ceilings() -> tuple[float, float]:
    from gpu_ops import ceilings

    return ceilings(torch.bfloat16)


def check_throughput(args) -> dict:
    needs_cuda()
    from cai_fast.engine import SamplingParams, load_model
    from cai_fast.engine.cached import CachedGenerator, EngineConfig
    from cai_fast.engine.model_runner import kv_shape

    tflops, gbps = _ceilings()
    loaded = load_model(str(args.model), dtype="bfloat16", device=DEVICE)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    params = sum(p.numel() for p in loaded.model.parameters())
    engine = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(pool_tokens=1 << 17, max_running=32))
    engine.stop_ids = set()
    prompts, new = _prompts(loaded.tokenizer, 32, 700, seed=1), 64
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # compile the kernels
    engine.stats = type(engine.stats)()
    engine.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.0))
    s = engine.stats
    decode_tps = s.decode_tokens / s.decode_seconds
    context = sum(len(p) for p in prompts) / len(prompts) + new / 2
    step_bytes = weights + 32 * context * kv_shape(loaded.model).bytes_per_token  # weights + every KV read once
    roofline_tps = 32 / (step_bytes / (gbps * 1e9))
    judge = CachedGenerator(loaded.model, loaded.tokenizer, EngineConfig(pool_tokens=1 << 17))
    rows = _prompts(loaded.tokenizer, 256, 600, seed=2)
    options = [[330], [389]]
    judge.score_options(rows[:4], options)
    judge.stats = type(judge.stats)()
    torch.cuda.synchronize() if DEVICE == "cuda" else None
    start = time.perf_counter()
    judge.score_options(rows, options)
    seconds = time.perf_counter() - start
    computed = judge.stats.prefill_computed
    judge_tflops = 2 * params * computed / seconds / 1e12
    return {"ceilings": {"bf16 TFLOP/s": round(tflops), "copy GB/s": round(gbps)},
            "decode batch 32 tok/s": round(decode_tps), "decode roofline tok/s": round(roofline_tps),
            "decode % of roofline": round(100 * decode_tps / roofline_tps, 1),
            "judge prompts/s": round(len(rows) / seconds, 1), "judge computed tok/s": round(computed / seconds),
            "judge TFLOP/s (2·params·tokens)": round(judge_tflops, 1),
            "judge % of bf16 matmul ceiling": round(100 * judge_tflops / tflops, 1),
            "kernels": engine.runner.kernels.as_dict(), "ok": True}


def check_pipeline(args) -> dict:
    """One round of the whole loop (SL-CAI, SFT, labels, reward, PPO, evaluation), tiny sizes.
    On CUDA it runs the random default-shaped model on the GPU (the pipeline's `device`; training
    takes the GPU through accelerate); off the GPU, the tests' tiny model keeps it short."""
    import tomllib

    from helpers.tiny import build_tiny_model
    from helpers.tiny import write_tiny_pipeline_config

    from cai_fast.pipeline.rounds import run_pipeline
    from cai_fast.pipeline.config import config_from_dict

    work = Path(tempfile.mkdtemp(prefix="gpu-check-pipeline-"))
    model = args.model if CUDA else build_tiny_model(work / "tiny")
    data = tomllib.loads(write_tiny_pipeline_config(work, "round", model).read_text().replace("rounds = 2", "rounds = 1", 1))
    data["device"] = "cuda" if CUDA else "cpu"
    start = time.perf_counter()
    state = run_pipeline(config_from_dict(data, "gpu_check"), progress=False)
    report = Path(state["report"]).is_file()
    return {"seconds": round(time.perf_counter() - start, 1), "model": str(model),
            "device": data["device"], "report written": report, "ok": report}


def check_gpu_ops(args) -> dict:
    needs_cuda()
    figures, ok = {}, True
    for dtype, tokens in (("bf16", 8192), ("fp32", 2048)):
        command = [sys.executable, str(ROOT / "benches/gpu_ops.py"), "--dtype", dtype, "--tokens", str(tokens)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        rows = [line for line in done.stdout.splitlines() if line.startswith("|") or "ceilings" in line]
        figures[dtype] = rows
        ok &= done.returncode == 0 and not any("MISMATCH" in r for r in rows)
        if done.returncode:
            figures[dtype + " error"] = done.stderr[-2000:]
    return {**figures, "ok": ok}


CHECKS = {"build": check_build, "CUDA KV kernels vs torch twin": check_kv_kernels,
          "Triton paged attention vs torch (bf16, fp32)": check_paged_attention,
          "engine greedy vs generate (bf16)": check_engine_greedy, "engine throughput": check_throughput,
          "benches/gpu_ops.py": check_gpu_ops, "pipeline round": check_pipeline}


# ---------------------------------------------------------------- report


def run_checks(args, names, device: str) -> dict:
    """Run the checks in order; the JSON and the table are rewritten after each one, so a run
    stopped by a time limit still leaves what it measured."""
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            result = {"status": None, **CHECKS[name](args)}
            result["status"] = "pass" if result.pop("ok") else "FAIL"
        except Skip as why:
            result = {"status": "skipped", "why": str(why)}
        except Exception as error:  # noqa: BLE001 - every failure is reported, then the run fails
            result = {"status": "FAIL", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = result
        print(f"[gpu_check] {name}: {result['status']} ({result['seconds']} s)", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps({"device": device, "results": results}, indent=1))
        (args.out / "gpu_check.md").write_text(markdown(results, device))
    return results


def markdown(results: dict, device: str) -> str:
    lines = [f"GPU check on {device}", "", "| check | status | figures |", "|---|---|---|"]
    for name, r in results.items():
        shown = {k: v for k, v in r.items() if k not in ("status", "traceback", "bf16", "fp32")}
        lines.append(f"| {name} | {r['status']} | {json.dumps(shown)[:600]} |")
    for dtype in ("bf16", "fp32"):
        rows = results.get("benches/gpu_ops.py", {}).get(dtype)
        if rows:
            lines += ["", f"benches/gpu_ops.py --dtype {dtype}:", "", *rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--shapes-from", type=Path, required=True,
                        help="a model folder whose config and tokenizer the random model takes")
    parser.add_argument("--expect-cuda-build", action="store_true", help="fail when cai_fast._cuda was not built")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="run only these checks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.model = random_model(args.shapes_from, Path(tempfile.gettempdir()) / "cai-fast-gpu-check-model")
    device = torch.cuda.get_device_name() if CUDA else "CPU (GPU checks skipped)"
    results = run_checks(args, args.only or list(CHECKS), device)
    print(markdown(results, device))
    failed = [name for name, r in results.items() if r["status"] == "FAIL"]
    if failed:
        sys.exit(f"GPU CHECK FAILED: {', '.join(failed)} (details in {args.out / 'gpu_check.json'})")


if __name__ == "__main__":
    main()
