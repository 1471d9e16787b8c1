"""Memory of one FSDP process against one unsharded (data-parallel) process: SFT of the same model on two CPU
processes (torchrun, gloo), once with DDP (every process holds the whole weights, gradients and AdamW state) and
once with --fsdp full_shard, in the same run.

    python benches/bench_fsdp_memory.py [--model NAME] [--steps 2] [--batch 2]

Each process's figure is its peak RSS (ru_maxrss) over `train_sft` minus its RSS before (imports alone), with
glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS instead of
staying in the heap; the table gives both processes of each launch and the ratios FSDP / DDP. Weights load whole
on every process before they are sharded, so the sharded peak still holds one full copy of the weights for a
moment, and the main process gathers the whole weights again to save the model; what sharding divides is the
gradients, the optimizer state and the weights during training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = {"DDP (unsharded)": "", "FSDP full_shard": "full_shard"}


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def worker(model: str, data: str, out: str, fsdp: str, steps: int, batch: int) -> None:
    """One of the two processes: train, then write this process's peak RSS above its imports."""
    import torch.distributed as dist

    from cai_fast.cli import end_process_group
    from cai_fast.train.config import SFTConfig
    from cai_fast.train.sft import train_sft

    before = rss_gib()
    train_sft(SFTConfig(model=model, data=data, out=out, fsdp=fsdp, max_steps=steps, batch_size=batch,
                        save_every=0, max_length=128, mixed_precision="no", dtype="float32"), progress=False)
    Path(out, f"memory-{dist.get_rank()}.json").write_text(json.dumps({"peak_gib": rss_gib() - before}))
    end_process_group()


def launch(model: str, folder: Path, mode: str, steps: int, batch: int) -> list[float]:
    out = folder / (mode or "ddp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", "--model", model, "--data", str(folder / "sft.jsonl"), "--out", str(out), "--fsdp", mode,
               "--steps", str(steps), "--batch", str(batch)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{mode or 'ddp'} failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"memory-{rank}.json").read_text())["peak_gib"] for rank in (0, 1)]


def main() -> None:
    from cai_fast.config import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="examples per process per step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--fsdp", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.data, args.out, args.fsdp, args.steps, args.batch)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers.rows import sft_rows, write_jsonl

    folder = Path(tempfile.mkdtemp())
    write_jsonl(folder / "sft.jsonl", sft_rows(4 * args.batch * args.steps, seed=0))
    peaks = {name: launch(args.model, folder, mode, args.steps, args.batch) for name, mode in MODES.items()}
    print("| mode (2 CPU processes) | process 0 (main: saves) peak GiB | process 1 peak GiB |\n|---|---|---|")
    for name, (main_peak, other_peak) in peaks.items():
        print(f"| {name} | {main_peak:.3f} | {other_peak:.3f} |")
    ratios = [f"{s / w:.3f}" for s, w in zip(peaks["FSDP full_shard"], peaks["DDP (unsharded)"])]
    print(f"\nFSDP / unsharded, per process: {' and '.join(ratios)} (process 0, process 1)")


if __name__ == "__main__":
    main()
