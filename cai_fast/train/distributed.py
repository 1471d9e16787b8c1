"""Several processes through accelerate: the shared state, prompt sharding and one merged output.

Launch any `cai-fast` stage on N processes — `accelerate launch --num_processes N -m cai_fast.cli train sft ...`
(GPUs) or `torchrun --nproc_per_node N -m cai_fast.cli train sft ...` (CPUs, gloo) —; every process runs the same
command and this module tells each its share: `shard_for_process(items)` gives process p the items p, p + N,
p + 2N, ...; `gather_shards` puts the per-process results back in the original order on every process, and
`write_merged_jsonl` has the main process write them as one file. With one process all three are the identity.
A training stage's --device decides the state (`bind_device`): `cpu=True` on the CPU (which is what makes
accelerate use gloo under torchrun), accelerate's GPU per process on CUDA.

Sharded training (FSDP2, torch's `fully_shard`): `--fsdp full_shard` (or `shard_grad_op`), or `accelerate launch
--config_file` with `distributed_type: FSDP` and `fsdp_version: 2` (`fsdp_mode`); the rest of such a config's
fsdp_config is honoured or refused in one line (`fsdp_settings`). `shard_model` makes each transformer block one
unit and the rest (embeddings, final norm, LM and value/score heads) the root unit; `full_state_dict` gathers the
whole weights (for a checkpoint, the saved model, the rollout engine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object
from torch import nn

from ..engine.device import DeviceError
from ..store import write_jsonl


def make_accelerator(mixed_precision: str = "no", log_with=None, project_dir=None,
                     cpu: bool | None = None) -> Accelerator:
    """An Accelerator with this autocast precision ("auto": what `accelerate launch
    --mixed_precision` or ACCELERATE_MIXED_PRECISION says, else "no") and these trackers, on the
    CPU when `cpu` (default: when there is no CUDA device). accelerate keeps one process-wide
    state, which another trainer in this process (trl's, say) may have left in another precision;
    that part (not the process group) is reset."""
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    if mixed_precision == "auto":
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision == "fp16" and cpu:
        raise ValueError("fp16 mixed precision needs a CUDA GPU (accelerate would quietly train in fp32 on the "
                         "CPU); use --mixed-precision bf16 or no")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", "no") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with, project_dir=project_dir)


def bind_device(device: torch.device) -> None:
    """Make accelerate's process state agree with `device` (a resolved --device).

    One process: the state follows `device` (made anew when an earlier stage of this process left
    it on another kind of device), and cuda:N becomes the current CUDA device (accelerate's "cuda").
    Several (torchrun, accelerate launch): accelerate gives each process its own device
    (cuda:LOCAL_RANK, or the CPU over gloo with --device cpu); a --device that names another kind, or
    one GPU for all, is a DeviceError (one line) before anything is loaded."""
    state = PartialState(cpu=device.type == "cpu")
    if state.num_processes > 1:
        if state.device.type != device.type or device.index is not None:
            raise DeviceError(f"--device {device} under {state.num_processes} processes: accelerate runs process "
                              f"{state.process_index} on {state.device}; pass --device auto (or cpu / cuda to match "
                              "the launch)")
        return
    if state.device.type != device.type:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState(cpu=device.type == "cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def process_state() -> PartialState:
    return PartialState(cpu=not torch.cuda.is_available())


def shard_for_process(items: Sequence, state: PartialState | None = None) -> list:
    """This process's share of `items`: every num_processes-th item from its process_index."""
    state = state or process_state()
    return list(items[state.process_index :: state.num_processes])


def gather_shards(local: Sequence, state: PartialState | None = None) -> list:
    """The inverse of shard_for_process: all shards' results in the original order, everywhere."""
    state = state or process_state()
    shards = gather_object([list(local)]) if state.num_processes > 1 else [list(local)]
    merged = []
    for i in range(max((len(s) for s in shards), default=0)):
        merged += [s[i] for s in shards if i < len(s)]
    return merged


def write_merged_jsonl(path: str | Path, local_records: Sequence[dict],
                       state: PartialState | None = None) -> list[dict]:
    """Gather every process's records (of sharded items) and write them once, in item order."""
    state = state or process_state()
    merged = gather_shards(local_records, state)
    if state.is_main_process:
        write_jsonl(Path(path), merged)
    state.wait_for_everyone()
    return merged


def fsdp_mode(option: str) -> str:
    """How to shard: the --fsdp option when given ("full_shard", "shard_grad_op"), else what `accelerate launch`
    with an FSDP config put in the environment (ACCELERATE_USE_FSDP, FSDP_RESHARD_AFTER_FORWARD or the older
    FSDP_SHARDING_STRATEGY), else "" (none).
    accelerate's FSDP1 (fsdp_version: 1) is refused with a one-line ValueError: the training loops shard with FSDP2."""
    if option or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return option
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("the accelerate config asks for FSDP1; cai-fast shards with FSDP2: set fsdp_version: 2 "
                         "(or pass --fsdp full_shard)")
    keep = (os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("false", "shard_grad_op", "2")
            or os.environ.get("FSDP_SHARDING_STRATEGY", "").upper() in ("SHARD_GRAD_OP", "2"))
    return "shard_grad_op" if keep else "full_shard"


@dataclass(frozen=True)
class FSDPSettings:
    """How `shard_model` shards: the mode (`fsdp_mode`) and what an accelerate FSDP config adds (`fsdp_settings`)."""

    mode: str = "full_shard"  # or "shard_grad_op": keep each unit's gathered weights from forward to backward
    offload: bool = False  # fsdp_offload_params: shards, gradients and the optimizer step on the CPU
    units: tuple[str, ...] = ()  # fsdp_transformer_layer_cls_to_wrap: the unit classes (): the model's blocks
    no_wrap: bool = False  # fsdp_auto_wrap_policy NO_WRAP: the root unit alone
    forward_prefetch: bool = False  # fsdp_forward_prefetch: each unit gathers the next one's weights in forward
    backward_prefetch: bool = True  # fsdp_backward_prefetch NO_PREFETCH turns FSDP2's (BACKWARD_PRE) off
    sync_module_states: bool = False  # fsdp_sync_module_states: process 0's weights broadcast before sharding
    activation_checkpointing: bool = False  # fsdp_activation_checkpointing: as --gradient-checkpointing


def _true(value: str) -> bool:
    return value.strip().lower() in ("true", "1", "yes")


def _env_flag(name: str) -> bool:
    return _true(os.environ.get(name, "false"))


_REFUSED = (  # (accelerate's environment variable, the fsdp_config key, is the value refused?, what to do)
    ("FSDP_AUTO_WRAP_POLICY", "fsdp_auto_wrap_policy", lambda v: v.upper() == "SIZE_BASED_WRAP",
     "the fused losses read the embeddings and heads inside the root unit, so units are transformer blocks: "
     "use TRANSFORMER_BASED_WRAP or NO_WRAP"),
    ("FSDP_STATE_DICT_TYPE", "fsdp_state_dict_type", lambda v: v.upper() not in ("FULL_STATE_DICT", "1"),
     "checkpoints and the saved model are gathered whole into safetensors: use FULL_STATE_DICT"),
    ("FSDP_BACKWARD_PREFETCH", "fsdp_backward_prefetch", lambda v: v.upper() not in ("BACKWARD_PRE", "NO_PREFETCH"),
     "FSDP2 prefetches before each unit's backward: use BACKWARD_PRE or NO_PREFETCH"),
    ("FSDP_USE_ORIG_PARAMS", "fsdp_use_orig_params", lambda v: not _true(v),
     "FSDP2 always shards each original parameter: set it true"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_cpu_ram_efficient_loading", _true,
     "every process loads the whole model before it is sharded: set it false"),
    ("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD", "fsdp_activation_checkpointing_offload", _true,
     "checkpointed activations stay on the device: set it false"),
    ("FSDP_IGNORED_MODULES", "fsdp_ignored_modules", bool, "every module is sharded: leave it out"),
    ("FSDP_SHARDING_STRATEGY", "fsdp_sharding_strategy", lambda v: v.upper() not in ("FULL_SHARD", "SHARD_GRAD_OP",
                                                                                     "1", "2"),
     "use fsdp_reshard_after_forward (true: full_shard, false: shard_grad_op)"),
)


def fsdp_settings(mode: str) -> FSDPSettings:
    """The settings of a run sharded in `mode`: the defaults, with what `accelerate launch --config_file` put in the
    environment from its fsdp_config, each honoured or refused (ValueError, one line naming the setting).
    fsdp_min_num_params only counts for SIZE_BASED_WRAP, which is refused."""
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return FSDPSettings(mode)
    for env, key, refused, hint in _REFUSED:
        value = os.environ.get(env)
        if value is not None and refused(value):
            raise ValueError(f"accelerate config {key}: {value} is not supported by cai-fast's FSDP2 training; {hint}")
    units = tuple(n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip())
    return FSDPSettings(mode, offload=_env_flag("FSDP_OFFLOAD_PARAMS"), units=units,
                        no_wrap=os.environ.get("FSDP_AUTO_WRAP_POLICY", "").upper() == "NO_WRAP",
                        forward_prefetch=_env_flag("FSDP_FORWARD_PREFETCH"),
                        backward_prefetch=os.environ.get("FSDP_BACKWARD_PREFETCH", "").upper() != "NO_PREFETCH",
                        sync_module_states=_env_flag("FSDP_SYNC_MODULE_STATES"),
                        activation_checkpointing=_env_flag("FSDP_ACTIVATION_CHECKPOINTING"))


def _units(module: nn.Module, settings: FSDPSettings) -> list[nn.Module]:
    """The modules sharded as units of their own (besides the root), parents after their children."""
    blocks = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    if settings.no_wrap:
        return []
    if not settings.units:
        return [m for m in module.modules() if type(m).__name__ in blocks]
    present = {type(m).__name__ for m in module.modules()}
    missing = [name for name in settings.units if name not in present]
    if missing:
        raise ValueError(f"accelerate config fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which "
                         f"{type(module).__name__} does not hold; its blocks are {', '.join(sorted(blocks & present))}")
    inside = {id(m) for b in module.modules() if type(b).__name__ in blocks for m in b.modules()}
    units = [m for m in reversed(list(module.modules())) if type(m).__name__ in settings.units]
    outside = sorted({type(m).__name__ for m in units if id(m) not in inside})
    if outside:
        raise ValueError(f"accelerate config fsdp_transformer_layer_cls_to_wrap: {', '.join(outside)} lie outside "
                         "the transformer blocks; the fused losses read the embeddings and heads inside the root "
                         f"unit: name {', '.join(sorted(blocks & present))} or classes inside them")
    return units


def shard_model(module: nn.Module, settings: FSDPSettings, device: torch.device,
                mixed_precision: str = "no") -> nn.Module:
    """`module` sharded in place over all processes with FSDP2 and returned: each transformer block (a class
    named in a submodule's `_no_split_modules`, e.g. LlamaDecoderLayer; or the classes `settings.units` names)
    one unit, the rest the root unit. Its weights become DTensor shards, gathered unit by unit inside forward:
    read a weight only inside the root's forward (PolicyModule's head_fn). full_shard frees each block's gathered
    weights after its forward (least memory), shard_grad_op keeps them until its backward; --mixed-precision bf16
    gathers and computes in bf16 and reduces gradients in fp32; the rest of `settings` as FSDPSettings says."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if settings.sync_module_states:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
    precision = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mixed_precision == "bf16" else None
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if settings.offload else OffloadPolicy()
    options = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),)), "offload_policy": offload,
               "reshard_after_forward": settings.mode == "full_shard", "mp_policy": precision or MixedPrecisionPolicy()}
    units = _units(module, settings)
    for unit in units:
        fully_shard(unit, **options)
    fully_shard(module, **options)
    ordered = [m for m in module.modules() if any(m is u for u in units)]  # forward order
    for unit, following in zip(ordered, ordered[1:]) if settings.forward_prefetch else ():
        unit.set_modules_to_forward_prefetch([following])
    for unit in ordered if not settings.backward_prefetch else ():
        unit.set_modules_to_backward_prefetch([])
    return module


def is_sharded(module: nn.Module) -> bool:
    """Whether `module` is sharded with FSDP2 (`shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(module: nn.Module, everywhere: bool = False, trained: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict of `module` (sharded or not; only its trained weights with `trained`) on the CPU, names
    as unsharded. Under FSDP every process must call it (it gathers); only the main process gets the tensors unless
    `everywhere`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere, ignore_frozen_params=trained)
    state = get_model_state_dict(module, options=options)
    return {name: value.cpu() for name, value in state.items()} if everywhere else state
