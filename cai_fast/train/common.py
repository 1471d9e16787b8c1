"""What every training stage shares: model loading (LoRA or full), the policy seen as hidden
states, the data order, the optimizer and its schedule, the accumulated step, checkpoints and
resume, the metrics log.

A run writes to one folder, OUT: OUT/checkpoints/ (the config and the latest checkpoint, safetensors + JSON only),
OUT/metrics.jsonl, OUT/train_result.json (written last: the run is complete) and the trained model + tokenizer
(`load_model(OUT)` loads a policy). Re-running the same command after a kill continues from the latest checkpoint
and computes exactly what the uninterrupted run would have (data order and random state are functions of (seed,
step)). Folder layout and resume: `TrainRun`; device and precision: `placement`; several processes: `accumulated_step`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..engine.device import dtype_name, resolve
from ..data import load_prompts
from ..data.constitution import load_constitution
from ..engine.loading import (
    ModelLoadError, check_model_folder, load_model, model_sha256, require_peft, resolve_model_path,
)
from ..engine.logits import LogitTransform
from ..ops import linear_logprobs
from ..seeding import stable_seed
from ..store import RunFolderError, RunStore, read_json, unwritable, write_atomic, write_jsonl
from .config import PPOConfig, TrainConfig
from .data import PreferencePair, TokenBatch, TrainDataError, check_data_path, tokenized_records
from .distributed import (
    bind_device, fsdp_mode, fsdp_settings, full_state_dict, make_accelerator, process_state, shard_for_process,
    shard_model,
)


@dataclass
class TrainResult:
    out: Path
    history: list[dict]  # one dict of metrics per step
    summary: dict  # steps, seconds, final metrics, and the stage's evaluation


class PolicyModule(nn.Module):
    """A causal LM seen as its final hidden states; the LM head is applied by the fused ops.

    forward(input_ids [B, T], attention_mask [B, T]) -> hidden [B, T, H] (after the final norm);
    forward(input_ids, attention_mask, head_fn) -> head_fn(module, hidden), called inside forward: the
    loss reads the heads there, where FSDP has gathered the root unit's weights (an LM head read
    after forward would be this process's shard).
    `head()` -> (weight [V, H], bias [V] or None) of the LM head.
    """

    def __init__(self, lm):
        super().__init__()
        transform = LogitTransform.of(lm.config)
        if not transform.linear:
            raise ValueError(f"{type(lm).__name__}'s logits are not its LM head's output ({transform.describe()[2:]}): "
                             "the fused training losses read the head's output as is, so cai-fast cannot train it yet "
                             "(generation, judging and labelling run it)")
        self.lm = lm

    def forward(self, input_ids, attention_mask, head_fn=None):
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        return hidden if head_fn is None else head_fn(self, hidden)

    def head(self):
        head = self.lm.get_output_embeddings()
        return head.weight, head.bias


def with_lora(model, config: TrainConfig, task_type: str):
    """The model with LoRA adapters (peft) on config.lora_target_modules, or itself when lora_r is 0."""
    if not config.lora_r:
        return model
    peft = require_peft()
    targets = config.lora_target_modules
    targets = targets if targets == "all-linear" else [name.strip() for name in targets.split(",") if name.strip()]
    return peft.get_peft_model(model, peft.LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, task_type=task_type))


def prepare_for_training(model, config: TrainConfig):
    """The model in train mode, with gradient checkpointing when config asks, or the accelerate FSDP config's
    fsdp_activation_checkpointing (before LoRA is added)."""
    mode = sharding(config)
    if config.gradient_checkpointing or (mode and fsdp_settings(mode).activation_checkpointing):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


class Placement(NamedTuple):
    """Where a training stage's models live and in what precision (its --device and --dtype)."""

    device: torch.device
    trained: torch.dtype  # the trained model (a LoRA policy's base too): fp32 under auto and float16
    frozen: torch.dtype  # the models only read: a reference loaded apart, PPO's reward model


def placement(config: TrainConfig) -> Placement:
    """config.device and config.dtype resolved here (engine.device.resolve); DeviceError for a device
    or dtype that cannot be used. An explicit float32 or bfloat16 applies to the trained model too
    (trl's --dtype); float16 does not: AdamW's eps (1e-8) underflows in fp16 and the first step is NaN.

    Every model of a stage lives on config.device. Under `--dtype auto` the frozen ones (a reference
    loaded apart, PPO's reward model) are loaded in bf16 where the hardware multiplies bf16 natively
    (engine.device) and the trained one in fp32 (master weights; --mixed-precision bf16 autocasts its
    forward); an explicit float16 loads the frozen ones in it. Losses and log-probs are fp32 whatever
    the weights are (cai_fast.ops). The run config and the summary record each model's resolved device
    and dtype.
    """
    device, frozen = resolve(config.device, config.dtype)
    explicit = str(config.dtype).strip().lower() != "auto"
    trained = frozen if explicit and frozen != torch.float16 else torch.float32
    return Placement(device, trained, frozen)


def model_precisions(config: TrainConfig, stage: str) -> dict[str, dict[str, str]]:
    """{role: {"device", "dtype"}} of every model `stage` loads, as resolved here: what the run config
    and the summary record. Roles: policy (or reward_model, trained, in stage "reward"), reference
    (dpo, ppo; a LoRA policy's is the policy with its adapters off), reward_model or judge (ppo, frozen)."""
    where = placement(config)

    def names(dtype: torch.dtype) -> dict[str, str]:
        return {"device": str(where.device), "dtype": dtype_name(dtype)}

    models = {"reward_model" if stage == "reward" else "policy": names(where.trained)}
    if stage in ("dpo", "ppo"):
        models["reference"] = names(where.trained if config.lora_r and not config.ref_model else where.frozen)
    if stage == "ppo":
        models["judge" if config.reward_source == "judge" else "reward_model"] = names(where.frozen)
    return models


def load_policy(config: TrainConfig):
    """(causal LM of config.model in train mode, in placement(config).trained, with LoRA when
    config.lora_r > 0, tokenizer). It loads on the CPU; TrainRun moves it to the run's device."""
    loaded = load_model(config.model, dtype=dtype_name(placement(config).trained))
    return with_lora(prepare_for_training(loaded.model, config), config, "CAUSAL_LM"), loaded.tokenizer


class AdapterDisabled(nn.Module):
    """A LoRA policy with its adapters switched off: the frozen base model, without a second copy.

    Same forward as PolicyModule (head_fn gets the policy); call it under torch.no_grad(). The policy
    is held outside the module tree, so its weights are not registered twice (nor sharded twice).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self._policy = [policy]

    def forward(self, input_ids, attention_mask, head_fn=None):
        policy = unwrapped(self._policy[0])
        with policy.lm.disable_adapter():
            return policy(input_ids, attention_mask, head_fn)


def load_reference(config, policy: nn.Module, device) -> nn.Module:
    """The frozen reference of DPO/PPO: config.ref_model when given; else the policy with its
    adapters disabled when it is a LoRA policy; else a frozen copy of config.model. A model loaded
    apart is in placement(config).frozen, on `device`."""
    if config.lora_r and not config.ref_model:
        return AdapterDisabled(policy)
    frozen, device = dtype_name(placement(config).frozen), torch.device(device)
    where = "cpu" if device.type == "cpu" else str(device)  # accelerate's CPU processes are on "cpu:0"
    loaded = load_model(config.ref_model or config.model, dtype=frozen, device=where)
    module = PolicyModule(loaded.model).eval()
    module.requires_grad_(False)
    return module


def token_logprobs(module, batch: TokenBatch, temperature: float = 1.0, values: bool = False):
    """Log-probs of the batch's trained tokens under a PolicyModule, through `linear_logprobs`.

    Returns (logp [n], row of each token [n], hidden state that predicted it [n, H], or with
    `values` the value head's V of it [n] (PolicyWithValue)); tokens in row order, positions increasing.
    """
    def head_fn(policy, hidden):
        hidden, targets, rows = batch.targets(hidden)
        weight, bias = policy.head()
        logp = linear_logprobs(hidden, weight, targets, bias, temperature)
        return logp, rows, policy.values(hidden) if values else hidden

    return module(batch.input_ids, batch.attention_mask, head_fn)


def unwrapped(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself; FSDP2 shards in place)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def save_trained(model, tokenizer, out: Path, config: TrainConfig, state: dict | None = None) -> None:
    """Save a transformers model (with `state`, its gathered state dict, when it is sharded) and its tokenizer
    to `out`. A LoRA model saves its adapter alone (adapter_model.safetensors + adapter_config.json), or merged
    in with config.merge_lora."""
    if hasattr(model, "merge_and_unload") and config.merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(out, state_dict=state)
    tokenizer.save_pretrained(out)


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(stable_seed(seed, "epoch", epoch))
    return torch.randperm(n, generator=generator).tolist()


def step_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """The examples of step `step`: a window of the stream of seeded per-epoch permutations."""
    start = step * global_batch
    return [_epoch_order(n, seed, i // n)[i % n] for i in range(start, start + global_batch)]


def sharding(config: TrainConfig) -> str:
    """The FSDP mode of this run ("" for none): --fsdp or accelerate's FSDP config, when several processes run;
    ValueError (one line) for what cannot be sharded."""
    mode = fsdp_mode(config.fsdp) if process_state().num_processes > 1 else ""
    if mode and config.merge_lora:
        raise ValueError("--merge-lora under FSDP: save the adapter (--merge-lora 0) and merge it afterwards "
                         "(peft's merge_and_unload)")
    if mode:
        fsdp_settings(mode)  # refuses the accelerate FSDP settings that the training loops cannot honour
    return mode


def global_batch_size(config: TrainConfig) -> int:
    """Examples per optimizer step over all processes: batch_size × grad_accum × processes."""
    return config.batch_size * config.grad_accum * process_state().num_processes


def steps_for(config: TrainConfig, n: int, global_batch: int) -> int:
    return config.max_steps or max(1, math.ceil(config.epochs * n / global_batch))


def make_scheduler(optimizer, config: TrainConfig, total: int):
    """config.lr_scheduler (transformers' get_scheduler) over `total` optimizer steps, after
    config.warmup_steps of linear warm-up."""
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=total)


def trackers(report_to: str) -> list[str] | None:
    """accelerate's `log_with` for config.report_to ("none" -> no tracker)."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    return None if names in ([], ["none"]) else names


def readable(metrics: dict) -> dict:
    """Metrics rounded for printing to 4 significant digits (2e-05 stays 2e-05, not 0.0)."""
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in metrics.items()}


class TrainRun:
    """Accelerator, prepared module and optimizer, schedule, checkpoints and the metrics log.

    `steps` are the run's steps (what checkpoints count); `optimizer_steps` the scheduler's
    length (more than `steps` for PPO, which takes several optimizer steps per step).

    A run writes to one folder, OUT:

        OUT/checkpoints/config.json   the config the run started with; another config is refused
        OUT/checkpoints/step-NNNNNN/  the latest checkpoint: trainable weights, optimizer, scheduler,
                                      step and metrics history (written whole, then renamed into place),
                                      as safetensors + JSON only: resuming never unpickles anything
        OUT/metrics.jsonl             one line of metrics per step (rewritten from the history on resume)
        OUT/train_result.json         written last: the run is complete
        OUT/...                       the trained model + tokenizer (`load_model(OUT)` loads a policy)

    Re-running the same command after a kill continues from the latest checkpoint; after completion
    it returns the saved result. Data order is a function of (seed, step) alone — step k takes
    examples k·G … (k+1)·G − 1 of a stream of seeded per-epoch permutations, G the global batch —
    and the random state is reseeded from (seed, step, process) before every step, so a resumed run
    computes exactly what the uninterrupted one would have, and a checkpoint needs no RNG state.

    Under FSDP (`sharding`, several processes; see cai_fast.train.distributed.fsdp_mode) the module is
    sharded by `shard_model` instead of wrapped in DDP, and the optimizer holds the shards; checkpoints
    and the saved model are gathered whole (`full_state_dict`): the same files as an unsharded run's.
    """

    def __init__(self, config: TrainConfig, stage: str, module: nn.Module, steps: int, *,
                 optimizer_steps: int | None = None, progress: bool = True):
        self.config, self.stage, self.steps, self.progress = config, stage, steps, progress
        self.out = Path(config.out)
        self.accelerator = make_accelerator(config.mixed_precision, trackers(config.report_to), self.out,
                                            cpu=placement(config).device.type == "cpu")
        self.sharding = sharding(config)
        self.fsdp = fsdp_settings(self.sharding) if self.sharding else None
        module = module.to(self.accelerator.device)
        if self.sharding:
            module = shard_model(module, self.fsdp, self.device, self.accelerator.mixed_precision)
        self.params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = make_scheduler(optimizer, config, optimizer_steps or steps)
        self.module, self.optimizer = (module, optimizer) if self.sharding else self.accelerator.prepare(module,
                                                                                                         optimizer)
        self.accelerator.init_trackers(f"cai-fast-{stage}", config=asdict(config))
        self.step, self.history = 0, []
        self.started = time.perf_counter()

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def frozen(self, module: nn.Module) -> nn.Module:
        """A model the run only reads (DPO/PPO's reference), sharded like the trained one under FSDP."""
        if self.sharding and any(True for _ in module.parameters()):
            return shard_model(module, self.fsdp, self.device, self.accelerator.mixed_precision)
        return module

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients; the gradient norm."""
        max_norm = self.config.max_grad_norm or math.inf
        if self.sharding:  # the norm of the sharded gradients, over all processes
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm).full_tensor()
        else:
            norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def accumulated_step(self, local: Sequence, total_weight: float,
                         loss_fn: Callable[[nn.Module, Sequence], tuple[torch.Tensor, dict]]) -> dict:
        """Backward over this process's examples in micro-batches, then one optimizer step.

        loss_fn(module, examples) -> (summed loss, {metric: summed value}); sums are divided by
        the global `total_weight`. Returns the metrics summed over all processes.

        Data parallelism (accelerate): the module and optimizer go through `accelerator.prepare`
        (DDP: gradients all-reduced and averaged); each process takes every P-th example of the
        global batch (`shard_for_process`) and splits it into `grad_accum` micro-batches of
        `batch_size`. Losses are sums over the process's micro-batch divided by the global batch's
        total weight (tokens for SFT, pairs for DPO and the reward model) and multiplied by P, so
        one optimizer step sees the gradient of the global mean, whatever batch_size × grad_accum × P
        add up to that global batch. Under FSDP the gradients are reduce-scattered (averaged) after
        every micro-batch, so that they stay sharded.
        """
        scale = self.accelerator.num_processes / max(total_weight, 1e-12)
        chunks = [local[i : i + self.config.batch_size] for i in range(0, len(local), self.config.batch_size)]
        sums: dict[str, float] = {}
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last or self.sharding else self.accelerator.no_sync(self.module):
                loss, stats = loss_fn(self.module, chunk)
                self.accelerator.backward(loss * scale)
            for name, value in stats.items():
                sums[name] = sums.get(name, 0.0) + float(value)
        sums = self.sum_over_processes(sums)
        sums["grad_norm"] = self.optimizer_step()
        return sums

    def sum_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1 or not values:
            return values
        summed = self.accelerator.reduce(torch.tensor(list(values.values()), dtype=torch.float64, device=self.device),
                                         "sum")
        return dict(zip(values, summed.tolist()))

    def run(self, step_fn: Callable[[int], dict], desc: str) -> None:
        """Resume, then call step_fn(step) -> metrics for the remaining steps, with logs and
        checkpoints."""
        self.resume()
        bar = tqdm(total=self.steps, initial=self.step, desc=desc, unit="step",
                   disable=not (self.progress and self.is_main))
        while self.step < self.steps:
            torch.manual_seed(stable_seed(self.config.seed, self.stage, self.step, self.accelerator.process_index))
            lr = self.scheduler.get_last_lr()[0]
            metrics = {"step": self.step + 1, **step_fn(self.step), "lr": lr}
            self.step += 1
            self.log(metrics)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "reward", "kl", "lr")})
            if self.config.save_every and self.step % self.config.save_every == 0 and self.step < self.steps:
                self.save_checkpoint()
        bar.close()

    def log(self, metrics: dict) -> None:
        self.history.append(metrics)
        self.accelerator.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")

    # checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def trainable_names(self) -> list[str]:
        return [name for name, p in unwrapped(self.module).named_parameters() if p.requires_grad]

    def save_checkpoint(self) -> None:
        """Write the checkpoint of this step (the main process, with the weights and optimizer state gathered
        from all processes under FSDP) and drop the one before."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        module = unwrapped(self.module)
        weights = full_state_dict(module, trained=True)  # a LoRA run gathers its adapters, not the base
        optimizer = get_optimizer_state_dict(module, self.raw_optimizer,
                                             options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            final = self.checkpoint_root / f"step-{self.step:06d}"
            tmp = self.checkpoint_root / f".tmp-step-{self.step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                self._write_checkpoint(tmp, {name: weights[name] for name in self.trainable_names()}, optimizer)
                tmp.replace(final)
            except (OSError, RunFolderError) as err:  # disk full, read-only: the last checkpoint stays
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(err, OSError):
                    raise RunFolderError(unwritable(self.checkpoint_root, err)) from None
                raise
            for old in self.checkpoints()[:-1]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    @property
    def raw_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer (inside accelerate's wrapper, if any)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _write_checkpoint(self, folder: Path, weights: dict, optimizer: dict) -> None:
        """weights: the trainable ones by name; optimizer: its state with parameters named (not numbered),
        as torch.distributed.checkpoint's full state dicts name them."""
        folder.mkdir(parents=True)
        save_file(weights, folder / TRAINABLE_FILE)
        tensors = {}
        state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict()}
        write_atomic(folder / OPTIMIZER_STATE, json.dumps(state_to_json(state, tensors, "state")))
        save_file(tensors, folder / OPTIMIZER_TENSORS)
        write_atomic(folder / "state.json", json.dumps({"step": self.step, "history": self.history}))

    def checkpoints(self) -> list[Path]:
        return sorted(self.checkpoint_root.glob("step-[0-9][0-9][0-9][0-9][0-9][0-9]"))

    def resume(self) -> None:
        """Load the latest checkpoint, if any, and rewrite the metrics log to match it."""
        found = self.checkpoints()
        if found:
            self._load_checkpoint(found[-1])
        if self.is_main:
            write_jsonl(self.out / "metrics.jsonl", self.history)
        self.accelerator.wait_for_everyone()

    def _load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, step and history; ValueError (one line) for a
        checkpoint that is not what this run writes."""
        try:
            state = load_file(path / TRAINABLE_FILE)  # on the CPU; load_state_dict moves them
            tensors = load_file(path / OPTIMIZER_TENSORS)
            opt = state_from_json(read_json(path / OPTIMIZER_STATE, "the optimizer state"), tensors)
            saved = read_json(path / "state.json", "the checkpoint's step and history")
            step, history = saved["step"], saved["history"]
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a usable checkpoint ({' '.join(str(err).split())}); remove it to "
                             f"restart from scratch (or {self.checkpoint_root} to start over)") from None
        missing = [name for name in self.trainable_names() if name not in state]
        if missing:
            raise ValueError(f"{path} does not match this model ({len(missing)} trainable weights missing, "
                             f"e.g. {missing[0]}); remove {self.checkpoint_root} to start over")
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        module, whole = unwrapped(self.module), StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(module, state, options=whole)  # every process shards what it read
        set_optimizer_state_dict(module, self.raw_optimizer, opt["optimizer"], options=whole)
        self.scheduler.load_state_dict(opt["scheduler"])
        self.step, self.history = step, history
        if self.is_main:
            print(f"cai-fast: resuming {self.stage} from step {self.step} ({path})", flush=True)

    def finish(self, model: nn.Module, tokenizer, extra: dict | None = None) -> TrainResult:
        """Save `model` (a transformers model inside the trained module; gathered whole under FSDP) and
        the tokenizer (main process), mark the run complete and drop the checkpoints."""
        state = full_state_dict(model) if self.sharding else None
        seconds = round(time.perf_counter() - self.started, 1)
        summary = {"stage": self.stage, "steps": self.step, "train_seconds": seconds,
                   "models": model_precisions(self.config, self.stage),
                   "autocast": self.accelerator.mixed_precision, "fsdp": self.sharding,
                   **({"fsdp_settings": asdict(self.fsdp)} if self.fsdp else {}),
                   "final": self.history[-1] if self.history else {}, **(extra or {})}
        if self.is_main:
            save_trained(model, tokenizer, self.out, self.config, state)
            write_atomic(self.out / RESULT_FILE, json.dumps({"summary": summary, "history": self.history}, indent=1))
            for path in self.checkpoints():
                shutil.rmtree(path)
        for tracker in self.accelerator.trackers:  # not end_training(): it ends the process group too
            tracker.finish()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.out, self.history, summary)


RESULT_FILE = "train_result.json"
TRAINABLE_FILE, OPTIMIZER_TENSORS, OPTIMIZER_STATE = "trainable.safetensors", "optimizer.safetensors", "optimizer.json"


def state_to_json(value, tensors: dict[str, torch.Tensor], name: str):
    """A state dict (nested dicts, lists, tuples, tensors, numbers, strings) as JSON-ready nodes;
    its tensors go into `tensors` under their path. `state_from_json` is the inverse."""
    if torch.is_tensor(value):
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        return {"dict": [[k, state_to_json(v, tensors, f"{name}.{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [state_to_json(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]}
    return {"value": value}


def state_from_json(node: dict, tensors: dict[str, torch.Tensor]):
    """The state dict `state_to_json` made; KeyError/ValueError for anything else."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unexpected node {node!r:.60} in the saved state")
    (kind, content), = node.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {k: state_from_json(v, tensors) for k, v in content}
    if kind in ("list", "tuple"):
        items = [state_from_json(v, tensors) for v in content]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (content is None or isinstance(content, (bool, int, float, str))):
        return content
    raise ValueError(f"unexpected {kind!r} node in the saved state")


def check_reward_model(path: Path) -> None:
    """A one-line error unless `path` holds a one-label sequence classifier (or an adapter of one),
    saved as safetensors without remote code (check_model_folder)."""
    check_model_folder(path, str(path))
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        if json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS":
            return
        kinds = ["a LoRA adapter of a causal LM"]
    elif (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        kinds = config.get("architectures") or []
        one_label = len(config.get("id2label", [0, 1])) == 1
        if one_label and any(kind.endswith("ForSequenceClassification") for kind in kinds):
            return
    else:
        kinds = ["no config.json"]
    raise ModelLoadError(f"{path} is not a reward model (a one-label sequence classifier; it holds {kinds}); "
                         "train one with `cai-fast train reward` or trl's RewardTrainer")


def check_inputs(config: TrainConfig) -> None:
    """Fail before the run folder is written: every model loads safely, the data is there."""
    for name in (config.model, getattr(config, "ref_model", ""), getattr(config, "judge_model", "")):
        if name:
            resolve_model_path(name)
    if getattr(config, "reward_model", ""):
        check_reward_model(Path(config.reward_model))
    if isinstance(config, PPOConfig):
        load_prompts(config.data)
        if config.reward_source == "judge":
            load_constitution(config.constitution)
    else:
        check_data_path(config.data)


def start_run(config: TrainConfig, stage: str) -> TrainResult | None:
    """Check the device and dtype (accelerate's process state made to agree: bind_device), the
    inputs and the output folder's saved config (refusing another; it records each model's resolved
    device and dtype), and seed torch from config.seed (for what is initialised at random: LoRA
    adapters, the reward head). The saved result if the run is complete, else None."""
    out = Path(config.out)
    models = model_precisions(config, stage)  # a device or dtype that cannot be used fails first
    bind_device(placement(config).device)
    sharding(config)  # an FSDP1 accelerate config, say, fails before the folder is written
    check_inputs(config)
    started = (out / RESULT_FILE).is_file() or any((out / "checkpoints").glob("step-*"))
    digests = {f"{k}_sha256": model_sha256(getattr(config, k))  # by content: the same model by another path resumes
               for k in ("model", "ref_model", "reward_model", "judge_model") if getattr(config, k, "")}
    RunStore(out / "checkpoints", {**asdict(config), **digests, "stage": stage, "models": models}, started=started,
             lock=process_state().is_main_process)
    torch.manual_seed(config.seed)
    result = out / RESULT_FILE
    if not result.is_file():
        return None
    saved = read_json(result, "the finished run's result")
    if process_state().is_main_process:
        print(f"cai-fast: {stage} run in {out} is already complete; returning its result", flush=True)
    return TrainResult(out, saved["history"], saved["summary"])


def training_examples(config: TrainConfig, kind: str, tokenizer, tokenize: Callable) -> list:
    """The records of `config.data` (read as `kind`, see cai_fast.train.data), each tokenized by
    tokenize(tokenizer, record, config.max_length), without those that keep no trained token."""
    items = tokenized_records(tokenizer, config.data, kind, tokenize, config.max_length)
    return with_trained_tokens(items, config.max_length, config.data)


def with_trained_tokens(items: list, max_length: int, data: str) -> list:
    """The examples (TokenizedChat) or pairs (PreferencePair: both sides) that keep at least one
    trained token within max_length; the others are left out, and counted aloud."""
    def trainable(item) -> bool:
        sides = (item.chosen, item.rejected) if isinstance(item, PreferencePair) else (item,)
        return all(side.trained_tokens for side in sides)

    kept = [item for item in items if trainable(item)]
    if not kept:
        raise TrainDataError(f"{data}: no example has a trained token within max_length={max_length}; "
                             "raise --max-length")
    if len(kept) < len(items) and process_state().is_main_process:
        print(f"cai-fast: {len(items) - len(kept)} of {len(items)} examples have no trained token within "
              f"max_length={max_length} and are left out (raise --max-length to keep them)", flush=True)
    return kept


def local_examples(items: Sequence, indices: Sequence[int]) -> list:
    """This process's share of the global batch `indices`."""
    return shard_for_process([items[i] for i in indices])
