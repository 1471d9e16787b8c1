"""Training stages: SFT, reward model, DPO and PPO, each a config dataclass and a function.

    train_sft(SFTConfig), train_reward_model(RewardConfig) -> TrainResult     cai-fast train sft | reward
    train_dpo(DPOConfig), train_ppo(PPOConfig)              -> TrainResult     cai-fast train dpo | ppo
    load_reward_model(path)            -> RewardScorer: scorer(prompts, responses) -> list[float]
    shard_for_process / gather_shards / write_merged_jsonl   prompt-sharded work under accelerate

Every loss and log-prob goes through cai_fast.ops (the [tokens × vocab] logits never exist).
The configs import without torch; the rest is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

from .config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, TrainConfig

_LAZY = {
    "train_sft": "sft", "train_reward_model": "reward", "load_reward_model": "reward",
    "RewardScorer": "reward", "train_dpo": "dpo", "train_ppo": "ppo", "TrainResult": "common",
    "shard_for_process": "distributed", "gather_shards": "distributed", "write_merged_jsonl": "distributed",
}

__all__ = ["DPOConfig", "PPOConfig", "RewardConfig", "SFTConfig", "TrainConfig", "STAGES", "Stage", *_LAZY]


class Stage(NamedTuple):
    """A training stage: what it does, its config, and the name of its function in this package."""

    help: str
    config: type
    runner: str

    def run(self, config, *, progress: bool = True):
        """Run the stage with `config` (an instance of self.config); its TrainResult."""
        return __getattr__(self.runner)(config, progress=progress)


STAGES = {  # the one registry of training stages: the CLI's subcommands and the pipeline's stages
    "sft": Stage("supervised fine-tuning on chats, loss on assistant tokens (SL-CAI data)", SFTConfig, "train_sft"),
    "reward": Stage("reward model on (soft) preference labels: backbone + scalar head", RewardConfig,
                    "train_reward_model"),
    "dpo": Stage("DPO on preference pairs, soft labels as per-pair targets", DPOConfig, "train_dpo"),
    "ppo": Stage("PPO of a policy against a reward model, KL to the SFT reference", PPOConfig, "train_ppo"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
