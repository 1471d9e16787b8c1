"""One process of the two-process run in tests/test_train_distributed.py (started by torchrun).

    torchrun --standalone --nproc_per_node 2 tests/accelerate_worker.py SPEC.json

SPEC holds the SFT config fields ("sft") and the generation job ("generate": model, prompts,
max_new_tokens, out). Every process trains its share of each global batch (data-parallel through
accelerate) and generates for its share of the prompts; the merged generations are written once.
"""

from __future__ import annotations

import json
import sys

from cai_fast.cli import end_process_group
from cai_fast.engine import SamplingParams, load_model, make_generator
from cai_fast.data.prompts import render, user
from cai_fast.train.config import SFTConfig
from cai_fast.train.distributed import process_state, shard_for_process, write_merged_jsonl
from cai_fast.train.sft import train_sft


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
    train_sft(SFTConfig(**spec["sft"]), progress=False)
    generate_sharded(spec["generate"])
    end_process_group()  # as the command line does


if __name__ == "__main__":
    main(sys.argv[1])
