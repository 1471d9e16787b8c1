"""Training stages: SFT, reward model, DPO and PPO, each a config dataclass and a function.

    train_sft(SFTConfig)               -> TrainResult     cai-fast train sft
    train_reward_model(RewardConfig)   -> TrainResult     cai-fast train reward
    train_dpo(DPOConfig)               -> TrainResult     cai-fast train dpo
    train_ppo(PPOConfig)               -> TrainResult     cai-fast train ppo
    load_reward_model(path)            -> RewardScorer: scorer(prompts, responses) -> list[float]
    shard_for_process / gather_shards / write_merged_jsonl   prompt-sharded work under accelerate

Every loss and log-prob goes through cai_fast.ops (the [tokens × vocab] logits never exist).
The configs import without torch; the rest is imported on first use.
"""

from __future__ import annotations

import importlib

from .config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, TrainConfig

_LAZY = {
    "train_sft": "sft", "train_reward_model": "reward", "load_reward_model": "reward",
    "RewardScorer": "reward", "train_dpo": "dpo", "train_ppo": "ppo", "TrainResult": "common",
    "shard_for_process": "distributed", "gather_shards": "distributed", "write_merged_jsonl": "distributed",
}

__all__ = ["DPOConfig", "PPOConfig", "RewardConfig", "SFTConfig", "TrainConfig", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
