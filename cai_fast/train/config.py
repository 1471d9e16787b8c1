"""The config of every training stage: one dataclass each, a `help` on every field.

`TrainConfig` holds what all stages share; SFTConfig, RewardConfig, DPOConfig and PPOConfig add
their own fields and defaults. Torch-free, so that the CLI builds its options without loading it.
Invalid values raise ValueError naming the field (the CLI prints it as a one-line error).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DEFAULT_MODEL, check_finite, option

# transformers.get_scheduler's schedules that need no extra arguments
REWARDS = ("model", "judge")  # what scores PPO's responses
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")


@dataclass
class TrainConfig:
    """Fields shared by every stage; each stage's config adds its own and sets its defaults."""

    model: str = option(DEFAULT_MODEL, "model to start from: transformers id or local folder")
    data: str = option("", "training data: a JSONL/JSON/CSV/parquet/arrow file, a folder of them, an SL-CAI / "
                           "RLAIF run folder, or a Hub dataset id (name[:split])")
    out: str = option("runs/train", "output folder (checkpoints, metrics, the trained model)")
    lr: float = option(2e-5, "peak learning rate (AdamW)")
    batch_size: int = option(4, "examples per micro-batch on each process")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    epochs: float = option(1.0, "passes over the data (ignored when --max-steps is set)")
    max_steps: int = option(0, "optimizer steps to run (0 = from --epochs)")
    warmup_steps: int = option(0, "linear warm-up steps, then the --lr-scheduler schedule")
    lr_scheduler: str = option("linear", "learning-rate schedule after warm-up (transformers' names): "
                                         "linear, cosine, constant, constant_with_warmup, ...")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0 = no clipping)")
    max_length: int = option(1024, "longest training sequence in tokens; longer ones keep their start")
    lora_r: int = option(0, "LoRA rank (peft, on --lora-target-modules); 0 = full fine-tuning")
    lora_alpha: float = option(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA adapters' input")
    lora_target_modules: str = option("all-linear", "modules that get adapters: all-linear, or comma-separated "
                                                    "names (q_proj,v_proj)")
    merge_lora: bool = option(False, "save the model with the adapters merged in; else the adapter alone "
                                      "(adapter_model.safetensors, loadable with peft)")
    mixed_precision: str = option("auto", "no, bf16 or fp16 autocast; auto = accelerate's (`accelerate launch "
                                          "--mixed_precision`, ACCELERATE_MIXED_PRECISION), else no")
    device: str = option("auto", "where the stage's models live (policy, reference, reward model): auto (CUDA when "
                                 "there is one, else the CPU), cpu, cuda, cuda:N; under several processes accelerate "
                                 "gives each its own device, so auto, cpu or cuda")
    dtype: str = option("auto", "precision the models are loaded in: auto = the frozen ones (reference, PPO's "
                                "reward model) in bf16 where the hardware multiplies bf16 natively, else fp32, and "
                                "the trained one in fp32 (--bf16 autocasts it); float32, bfloat16 = every model, the "
                                "trained one too (pure bf16 training, as trl's --dtype); float16 = the frozen ones "
                                "(pure fp16 AdamW is NaN); losses and log-probs are fp32 whatever it is")
    fsdp: str = option("", "shard the trained model (and a reference loaded apart) over the processes with FSDP2: "
                           "full_shard, or shard_grad_op (blocks stay gathered from forward to backward); default: "
                           "what an `accelerate launch --config_file` FSDP config says, else none (DDP)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, "
                                                 "about a third more time)")
    report_to: str = option("none", "trackers for the metrics (accelerate's): tensorboard, wandb, trackio, "
                                    "comma-separated, or none")
    save_every: int = option(50, "write a checkpoint every N steps (0 = none; the run then restarts when killed)")
    seed: int = option(0, "seed for data order, initialisation and sampling")

    def __post_init__(self):
        check_finite(self)
        if not self.data:
            raise ValueError("no training data: pass --data with a JSONL file or a folder of them")
        positive = ("batch_size", "grad_accum", "max_length")
        non_negative = ("max_steps", "warmup_steps", "lora_r", "save_every", "weight_decay", "max_grad_norm")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, allowed in (("mixed_precision", ("auto", "no", "bf16", "fp16")),
                              ("merge_lora", (0, 1)), ("gradient_checkpointing", (0, 1)),
                              ("lr_scheduler", LR_SCHEDULERS), ("fsdp", ("", "full_shard", "shard_grad_op"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr < 0 or self.epochs <= 0:
            raise ValueError(f"lr must be >= 0 and epochs > 0, got lr={self.lr}, epochs={self.epochs}")


@dataclass
class SFTConfig(TrainConfig):
    out: str = option("runs/sft", "output folder (checkpoints, metrics, the trained model)")
    lr: float = option(2e-5, "peak learning rate (AdamW); about 1e-4 suits LoRA")


@dataclass
class RewardConfig(TrainConfig):
    out: str = option("runs/reward", "output folder (checkpoints, metrics, the reward model)")
    lr: float = option(1e-5, "peak learning rate (AdamW)")
    eval_fraction: float = option(0.1, "share of pairs held out for accuracy and calibration (0 = none)")
    eval_steps: int = option(0, "also evaluate on the held-out pairs every N steps (0 = at the end only)")
    use_margin: bool = option(False, "subtract each record's 'margin' inside the sigmoid, as trl's "
                                     "RewardTrainer does; else ignore it (the soft label already carries it)")

    def __post_init__(self):
        super().__post_init__()
        if self.eval_steps < 0:
            raise ValueError(f"eval_steps must be >= 0, got {self.eval_steps}")
        if not 0 <= self.eval_fraction < 1 or self.use_margin not in (0, 1):
            raise ValueError(f"eval_fraction must be in [0, 1) and use_margin 0 or 1, got "
                             f"{self.eval_fraction} and {self.use_margin}")


@dataclass
class DPOConfig(TrainConfig):
    out: str = option("runs/dpo", "output folder (checkpoints, metrics, the trained policy)")
    lr: float = option(1e-6, "peak learning rate (AdamW); about 5e-6 suits LoRA")
    beta: float = option(0.1, "β: how far the policy may move from the reference (higher = less)")
    ref_model: str = option("", "frozen reference policy (default: --model)")

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass
class PPOConfig(TrainConfig):
    data: str = option("red_team", "prompts: a file (text, JSONL, CSV, ...) or a shipped set name")
    out: str = option("runs/ppo", "output folder (checkpoints, metrics, the trained policy)")
    lr: float = option(1e-6, "peak learning rate (AdamW); about 1e-5 suits LoRA")
    reward_source: str = option("model", "what scores the responses: model (the reward model at --reward-model) "
                                         "or judge (d-RLAIF: --judge-model's direct score, 1-9 from its digit "
                                         "probabilities, averaged over --judge-principles principles of "
                                         "--constitution, minus the midpoint 5)")
    reward_model: str = option("", "reward model folder (from `cai-fast train reward`), with --reward-source model")
    judge_model: str = option("", "with --reward-source judge: the model that scores (default: --model)")
    constitution: str = option("default", "with --reward-source judge: the constitution it scores by (name or "
                                          "TOML path)")
    judge_principles: int = option(4, "with --reward-source judge: principles drawn per response (by weight)")
    ref_model: str = option("", "frozen KL reference policy (default: --model, the SFT policy)")
    minibatches: int = option(1, "optimizer steps per PPO epoch; prompts per step = batch_size x "
                                 "grad_accum x minibatches x processes")
    ppo_epochs: int = option(4, "passes over each step's rollouts")
    max_new_tokens: int = option(64, "longest sampled response in tokens")
    temperature: float = option(0.7, "sampling temperature (log-probs use the same)")
    kl_coef: float = option(0.05, "weight of the per-token KL penalty to the reference")
    gamma: float = option(1.0, "GAE discount γ")
    lam: float = option(0.95, "GAE λ")
    clip_range: float = option(0.2, "policy ratio clip ε")
    value_clip_range: float = option(0.2, "value clip ε_v")
    vf_coef: float = option(0.1, "weight of the value loss")
    engine: str = option("cached", "generation backend for rollouts: cached (prefix-cached paged engine) or plain")
    generation_batch: int = option(8, "prompts generated together")

    def __post_init__(self):
        super().__post_init__()
        if self.reward_source not in REWARDS:
            raise ValueError(f"reward_source must be one of {', '.join(REWARDS)}, got {self.reward_source!r}")
        if self.reward_source == "model" and not self.reward_model:
            raise ValueError("no reward model: pass --reward-model with a folder from `cai-fast train reward`, "
                             "or --reward-source judge for the judge's direct score")
        if self.reward_source == "judge" and self.reward_model:
            raise ValueError("--reward-source judge scores with the judge, not a reward model: drop --reward-model")
        for name in ("minibatches", "ppo_epochs", "max_new_tokens", "generation_batch", "judge_principles"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0 or not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError(f"temperature must be > 0 and gamma, lam in [0, 1], got {self.temperature}, "
                             f"{self.gamma}, {self.lam}")
