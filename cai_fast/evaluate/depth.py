"""Depth of alignment: how many harmful examples it takes to undo a model's safety.

    harmful_examples(sl_cai_dir)  -> [{"messages": [user x, assistant y0]}]   the harmful pairs
    depth_curve(model, examples, prompts, config, out_dir) -> {"curve": [{k, rate, complied, n, stderr}], ...}

Safety training can be shallow (Qi et al. 2023). For each k of `config.depth_rungs` a copy of `model` is fine-tuned
on the first k harmful examples (an SL-CAI run's initial answers that the refusal detector counts as compliant) and
its harmful compliance on `prompts` measured (cai_fast.evaluate.refusal); k = 0 is the model as it is. Each rung's
record is appended to out_dir as it is measured (cai_fast.store), so a killed run resumes at the rung.
"""

from __future__ import annotations

import gc
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Sequence

from ..data import prompts as P
from ..data import Prompt
from ..engine.base import SamplingParams
from .refusal import harmful_compliance, is_refusal
from ..responses import sample_responses
from ..store import RunStore, resume_batches, write_jsonl

FINE_TUNE_BATCH = 4


def harmful_examples(sl_cai_dir: str | Path) -> list[dict]:
    """SFT records (user prompt, compliant initial answer) of an SL-CAI run folder's records, in order."""
    shards = sorted(Path(sl_cai_dir).glob("records-[0-9][0-9][0-9][0-9][0-9].jsonl"))
    if not shards:
        raise ValueError(f"{sl_cai_dir}: no SL-CAI records (records-*.jsonl); give the folder of an SL-CAI run "
                         "(cai-fast sl-cai --out FOLDER), whose initial answers are the harmful examples")
    records = [_sl_cai_record(line, f"{shard} line {number}") for shard in shards
               for number, line in enumerate(shard.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    return [{"messages": [P.user(r["prompt"]), P.assistant(r["initial"])]} for r in records
            if r["initial"].strip() and not is_refusal(r["initial"])]


def _sl_cai_record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); fix or drop the line") from None
    for name in ("prompt", "initial"):
        if not isinstance(record, dict) or not isinstance(record.get(name), str):
            raise ValueError(f"{where}: field '{name}' must be a string (an SL-CAI record); fix or drop the line")
    return record


def rungs_for(ladder: Sequence[int], available: int) -> list[int]:
    """The ladder's counts capped at `available`, each once, in order."""
    return sorted({min(k, available) for k in ladder})


def depth_curve(model: str, examples: list[dict], prompts: Sequence[Prompt], config, out_dir: str | Path, *,
                progress: bool = True) -> dict:
    """Harmful compliance of `model` after fine-tuning on k of `examples`, per rung (module docstring);
    config is an EvalConfig (depth_rungs, depth_epochs, depth_lr, depth_tokens, generation_batch).

    Each rung fine-tunes a copy of `model` in a temporary folder (train_sft, full fine-tuning,
    `depth_epochs` epochs at `depth_lr`, batches of up to 4) and measures its harmful compliance: the
    share of greedy responses, of up to `depth_tokens` tokens, to `prompts` (the held-apart red-team
    prompts) that do not refuse. The responses come from the plain generator (transformers generate,
    the reference): a handful of prompts with no prefix in common leave the cached engine nothing to
    share. The fine-tuned models are never kept. A rung asking more examples than there are uses them
    all, and rungs that come to the same count are measured once.
    """
    rungs = rungs_for(config.depth_rungs, len(examples))
    digest = hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()
    store = RunStore(out_dir, {"stage": "depth", "model": model, "rungs": rungs, "examples_sha256": digest,
                               "prompt_ids": [p.id for p in prompts], **{k: getattr(config, k) for k in (
                                   "depth_epochs", "depth_lr", "depth_tokens", "subset_seed")}})

    def work(batch: list[int]) -> list[dict]:
        return [{"k": k, **_compliance_after(model, examples[:k], prompts, config, progress)} for k in batch]

    curve, _ = resume_batches(store, "rungs", rungs, work, batch_size=1, key="k", item_key=lambda k: k,
                              desc="depth of alignment", unit="rung", progress=progress)
    return {"model": model, "examples_available": len(examples), "n": len(prompts), "curve": curve}


def _compliance_after(model: str, examples: list[dict], prompts: Sequence[Prompt], config, progress: bool) -> dict:
    """harmful_compliance of `model` fine-tuned on `examples` (the model itself when there are none)."""
    from ..engine import load_model, make_generator
    from ..train import STAGES, SFTConfig

    with tempfile.TemporaryDirectory(prefix="cai-fast-depth-") as tmp:
        if examples:
            write_jsonl(Path(tmp) / "harmful.jsonl", examples)
            sft = SFTConfig(model=model, data=str(Path(tmp) / "harmful.jsonl"), out=str(Path(tmp) / "model"),
                            lr=config.depth_lr, epochs=config.depth_epochs, save_every=0, seed=config.subset_seed,
                            batch_size=min(FINE_TUNE_BATCH, len(examples)))
            STAGES["sft"].run(sft, progress=progress)
            model = sft.out
        generator = make_generator(load_model(model), engine="plain", batch_size=config.generation_batch)
        params = SamplingParams(config.depth_tokens, 0.0, 1.0, config.subset_seed)
        records, _ = sample_responses(generator, prompts, params, 1, batch_size=config.generation_batch,
                                      kind="depth", progress=False)
        del generator
        gc.collect()
    return harmful_compliance([r["samples"][0] for r in records])
