"""Two CPU processes (torchrun, gloo) give what one process gives: SFT weights and generations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from safetensors.torch import load_file

from cai_fast.engine import SamplingParams, load_model, make_generator
from cai_fast.data.prompts import render, user
from cai_fast.train.config import SFTConfig
from cai_fast.train.distributed import gather_shards, shard_for_process
from cai_fast.train.sft import train_sft

from helpers.rows import sft_rows, write_jsonl


WORKER = Path(__file__).with_name("accelerate_worker.py")
PROMPTS = ["Please rewrite the response", "the answer", "Which response is better", "identify ways",
           "remove harmful content"]


def test_shards_interleave_and_cover_every_item_once():
    items = list(range(11))
    shards = [shard_for_process(items, SimpleNamespace(process_index=p, num_processes=3)) for p in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    one = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True)
    assert shard_for_process(items, one) == items and gather_shards(items, one) == items


def test_two_processes_equal_one(tiny_model_path, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(11, seed=7))
    sft = dict(model=str(tiny_model_path), data=str(data), lr=3e-3, max_steps=3, save_every=0, seed=1)
    spec = {"sft": {**sft, "out": str(tmp_path / "two"), "batch_size": 2},
            "generate": {"model": str(tiny_model_path), "prompts": PROMPTS, "max_new_tokens": 6,
                         "out": str(tmp_path / "generated.jsonl")}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path / "spec.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    # global batch 4 as 2 processes × 2 equals 1 process × 4: same losses, same final weights
    one = train_sft(SFTConfig(**sft, out=str(tmp_path / "one"), batch_size=4), progress=False)
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [h["tokens"] for h in two] == [h["tokens"] for h in one.history]
    for theirs, ours in zip(two, one.history):
        assert abs(theirs["loss"] - ours["loss"]) < 1e-5
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    base = load_file(str(tiny_model_path / "model.safetensors"))
    assert max(float((a[k] - base[k]).abs().max()) for k in a) > 1e-3  # training moved the weights
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    # prompt-sharded generation, merged into one file in prompt order, equals one process's
    merged = [json.loads(line) for line in (tmp_path / "generated.jsonl").read_text().splitlines()]
    assert [r["index"] for r in merged] == list(range(len(PROMPTS)))
    assert [r["process"] for r in merged] == [0, 1, 0, 1, 0]  # two processes did run
    loaded = load_model(str(tiny_model_path), dtype="float32")
    single = make_generator(loaded, batch_size=1).generate(
        [render(loaded.tokenizer, [user(p)]) for p in PROMPTS], SamplingParams(max_new_tokens=6))
    assert [r["text"] for r in merged] == [c.text for c in single]
