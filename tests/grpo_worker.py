"""One process of the two-process GRPO run in tests/test_trl_compat.py (started by torchrun).

    torchrun --standalone --nproc_per_node 2 tests/grpo_worker.py MODEL_FOLDER OUT_FOLDER

trl's GRPOTrainer with one completion per process per step (num_generations 2 over 2 processes:
every group is split across them) and JudgeReward over the constitutional judge on the model;
each process writes what its reward function returned to OUT/rewards-RANK.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist


def main(model: str, out: str) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from cai_fast.engine import load_model
    from cai_fast.labelling.judge import ConstitutionalJudge, JudgeConfig
    from cai_fast.labelling.trl_compat import JudgeReward

    loaded = load_model(model, dtype="float32")
    calls = []

    class Recording(JudgeReward):
        def __call__(self, prompts, completions, **kwargs):
            rewards = super().__call__(prompts, completions, **kwargs)
            calls.append({"prompts": prompts, "completions": completions, "rewards": rewards})
            return rewards

    reward = Recording(ConstitutionalJudge(loaded, "default", JudgeConfig(principles=1, batch_size=4)))
    prompts = [[{"role": "user", "content": text}] for text in ("Say hi.", "Name a colour.")]
    args = GRPOConfig(output_dir=out, num_generations=2, max_completion_length=5, max_steps=2,
                      per_device_train_batch_size=1, report_to=[], bf16=False, use_cpu=True, save_strategy="no",
                      logging_steps=1, learning_rate=1e-3, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=loaded.tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    trainer.train()
    logs = trainer.state.log_history
    Path(out, f"rewards-{dist.get_rank()}.json").write_text(json.dumps({"calls": calls, "logs": logs}))
    # gloo's worker threads outlive a process group left to the interpreter's exit, which then
    # aborts ("terminate called without an active exception", pytorch/pytorch#190489)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
