"""One process of the two-process runs in tests/test_train_distributed.py (started by torchrun).

    torchrun --standalone --nproc_per_node 2 tests/accelerate_worker.py SPEC.json

SPEC holds the training runs ("train": [[stage, config fields], ...], run in turn: cai_fast.train.STAGES)
and optionally a generation job ("generate": model, prompts, max_new_tokens, out). Every process trains its
share of each global batch (data-parallel through accelerate, or sharded with "fsdp" in the fields) and
generates for its share of the prompts; the merged generations are written once.
"""

from __future__ import annotations

import json
import sys

from cai_fast.cli import end_process_group
from cai_fast.engine import SamplingParams, load_model, make_generator
from cai_fast.data.prompts import render, user
from cai_fast.train import STAGES
from cai_fast.train.distributed import process_state, shard_for_process, write_merged_jsonl


def generate_sharded(job: dict) -> None:
    state = process_state()
    loaded = load_model(job["model"], dtype="float32")
    mine = shard_for_process(list(enumerate(job["prompts"])), state)
    generator = make_generator(loaded, batch_size=1)
    prompts = [render(loaded.tokenizer, [user(text)]) for _, text in mine]
    completions = generator.generate(prompts, SamplingParams(max_new_tokens=job["max_new_tokens"]))
    records = [{"index": i, "text": c.text, "process": state.process_index} for (i, _), c in zip(mine, completions)]
    write_merged_jsonl(job["out"], records, state)


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    for stage, fields in spec.get("train", []):
        STAGES[stage].run(STAGES[stage].config(**fields), progress=False)
    if "generate" in spec:
        generate_sharded(spec["generate"])
    end_process_group()  # as the command line does


if __name__ == "__main__":
    main(sys.argv[1])
