"""Peak memory of DPO steps on the default model: full fine-tuning with a second, frozen
reference model (the only way before issue 13) against LoRA whose reference is the policy with
its adapter disabled (and the variants between).

    python benches/bench_dpo_memory.py [--steps 2] [--pairs 8] [--case NAME]

Each case runs in a fresh process (`--case`); its figure is the process's peak RSS (ru_maxrss)
over `train_dpo` on synthetic preference pairs, minus the RSS before the model loads (imports
alone). Times are wall seconds of the whole run, for orientation only: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # name: DPOConfig overrides
    "full + reference copy": {},
    "full + reference copy + checkpointing": {"gradient_checkpointing": True},
    "LoRA r16 + reference copy": {"lora_r": 16, "ref_model": "smollm2-135m-instruct"},
    "LoRA r16, adapter disabled": {"lora_r": 16},
    "LoRA r16, adapter disabled + checkpointing": {"lora_r": 16, "gradient_checkpointing": True},
}


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_case(name: str, steps: int, pairs: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.rows import preference_rows, write_jsonl

    from cai_fast.train.config import DPOConfig
    from cai_fast.train.dpo import train_dpo

    folder = Path(tempfile.mkdtemp())
    rows = preference_rows(pairs, seed=0, p_chosen=0.8)
    for row in rows:  # answers of about 100 tokens
        row["chosen"][0]["content"] *= 6
        row["rejected"][0]["content"] *= 6
    data = write_jsonl(folder / "pairs.jsonl", rows)
    before = rss_gib()
    started = time.perf_counter()
    train_dpo(DPOConfig(data=str(data), out=str(folder / "out"), batch_size=pairs, max_steps=steps, save_every=0,
                        max_length=256, mixed_precision="no", **CASES[name]), progress=False)
    return {"case": name, "peak_gib": round(rss_gib() - before, 3), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, help="run one case in this process")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step (one micro-batch)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.pairs)))
        return
    print("| case | peak GiB above imports | seconds |\n|---|---|---|")
    for name in CASES:
        done = subprocess.run([sys.executable, __file__, "--case", name, "--steps", str(args.steps),
                               "--pairs", str(args.pairs)], capture_output=True, text=True, env=os.environ)
        if done.returncode:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} | |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {name} | {result['peak_gib']} | {result['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
