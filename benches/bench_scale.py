"""Memory and resume time of the prompt loader and the run store against the number of prompts.

    python benches/bench_scale.py [--sizes 1000,100000]

Each size runs in a fresh process: a JSONL file of that many prompts is loaded (`load_prompts`),
then that many SL-CAI-sized records (~1.5 KB) are appended to a run folder 64 at a time, then the
folder is opened again and its done keys read, as a resumed run starts. Prints the peak RSS after
each phase and the times; the ratios between sizes say what grows with the file.
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
    from cai_fast.data import load_prompts
    from cai_fast.store import RunStore

    figures = {"prompts": n, "start_mb": peak_mb()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"prompt {i}: how would someone go about doing thing number {i}?"}) + "\n")
        start = time.perf_counter()
        prompts = load_prompts(path)
        figures |= {"load_s": time.perf_counter() - start, "after_load_mb": peak_mb(), "loaded": len(prompts)}
        del prompts
        store = RunStore(Path(tmp) / "run", {"n": n})
        start = time.perf_counter()
        for i in range(0, n, 64):
            store.append("records", [{"prompt_id": j, "final": "x" * 1500} for j in range(i, min(n, i + 64))])
        figures |= {"append_s": time.perf_counter() - start, "after_append_mb": peak_mb()}
        start = time.perf_counter()
        done = RunStore(Path(tmp) / "run", {"n": n}).keys("records", "prompt_id")
        figures |= {"resume_s": time.perf_counter() - start, "after_resume_mb": peak_mb(), "done": len(done)}
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
