"""Memory and resume time of the prompt loader and the run store against the number of prompts.

    python benches/bench_scale.py [--sizes 1000,100000]

Each size runs in a fresh process that imports numpy first, as every run does (torch, datasets): a
JSONL file of that many prompts is loaded (`load_prompts`) and read through once; then one
SL-CAI-sized record (~1.5 KB) per prompt is appended to a run folder 64 at a time; then the folder
is opened again and a resumed run walks every prompt (`resume_records`: each stored record read
back in the prompts' order, nothing made, nothing kept). Prints the peak RSS after each phase, the
process's RSS at the start, and the times; the ratios between sizes say what grows with the file.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_size(n: int) -> dict:
    import numpy  # noqa: F401  (imported by every run; the store and the loader use it past a few records)

    from cai_fast.data import load_prompts
    from cai_fast.store import RunStore, resume_records

    figures = {"prompts": n, "start_mb": peak_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"prompt {i}: how would someone go about doing thing number {i}?"}) + "\n")
        start = time.perf_counter()
        prompts = load_prompts(path)
        read = sum(1 for _ in prompts)
        figures |= {"load_s": time.perf_counter() - start, "after_load_mb": peak_mb(), "loaded": read}
        store = RunStore(Path(tmp) / "run", {"n": n})
        start, batch = time.perf_counter(), []
        for prompt in prompts:
            batch.append({"prompt_id": prompt.id, "final": "x" * 1500})
            if len(batch) == 64:
                store.append("records", batch)
                batch = []
        store.append("records", batch)
        figures |= {"append_s": time.perf_counter() - start, "after_append_mb": peak_mb()}
        start = time.perf_counter()
        walk = resume_records(RunStore(Path(tmp) / "run", {"n": n}), "records", prompts, list, batch_size=64,
                              progress=False)
        done = sum(earlier for _, earlier in walk)
        figures |= {"resume_s": time.perf_counter() - start, "after_resume_mb": peak_mb(), "done": done}
    return figures


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(args.one)))
        return []
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{n:>8} prompts: load {r['load_s']:.2f} s, peak {r['after_load_mb']:.0f} MB; append {r['append_s']:.2f} s, "
              f"peak {r['after_append_mb']:.0f} MB; resume {r['resume_s']:.2f} s, peak {r['after_resume_mb']:.0f} MB "
              f"(process start {r['start_mb']:.0f} MB)", flush=True)
    return rows


if __name__ == "__main__":
    main()
