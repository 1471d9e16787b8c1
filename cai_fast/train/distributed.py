"""Several processes through accelerate: the shared state, prompt sharding and one merged output.

Launch any `cai-fast` stage on N processes — `accelerate launch --num_processes N -m cai_fast.cli train sft ...`
(GPUs) or `torchrun --nproc_per_node N -m cai_fast.cli train sft ...` (CPUs, gloo) —; every process runs the same
command and this module tells each its share: `shard_for_process(items)` gives process p the items p, p + N,
p + 2N, ...; `gather_shards` puts the per-process results back in the original order on every process, and
`write_merged_jsonl` has the main process write them as one file. With one process all three are the identity.
A training stage's --device decides the state (`bind_device`): `cpu=True` on the CPU (which is what makes
accelerate use gloo under torchrun), accelerate's GPU per process on CUDA.

Sharded training (FSDP2, torch's `fully_shard`): `--fsdp full_shard` (or `shard_grad_op`), or `accelerate launch
--config_file` with `distributed_type: FSDP` and `fsdp_version: 2` (`fsdp_mode`). `shard_model` makes each
transformer block one unit and the rest (embeddings, final norm, LM and value/score heads) the root unit;
`full_state_dict` gathers the whole weights (for a checkpoint, the saved model, the rollout engine).
"""

from __future__ import annotations

import os
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
    with an FSDP config put in the environment (ACCELERATE_USE_FSDP, FSDP_RESHARD_AFTER_FORWARD), else "" (none).
    accelerate's FSDP1 (fsdp_version: 1) is refused with a one-line ValueError: the training loops shard with FSDP2."""
    if option or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return option
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError("the accelerate config asks for FSDP1; cai-fast shards with FSDP2: set fsdp_version: 2 "
                         "(or pass --fsdp full_shard)")
    keep = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("false", "shard_grad_op", "2")
    return "shard_grad_op" if keep else "full_shard"


def shard_model(module: nn.Module, mode: str, device: torch.device, mixed_precision: str = "no") -> nn.Module:
    """`module` sharded in place over all processes with FSDP2 and returned: each transformer block (a class
    named in a submodule's `_no_split_modules`, e.g. LlamaDecoderLayer) one unit, the rest the root unit. Its
    weights become DTensor shards, gathered unit by unit inside forward: read a weight only inside the root's
    forward (PolicyModule's head_fn). full_shard frees each block's gathered weights after its forward (least
    memory), shard_grad_op keeps them until its backward; --mixed-precision bf16 gathers and computes in bf16
    and reduces gradients in fp32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    precision = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if mixed_precision == "bf16" else None
    settings = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),)),
                "reshard_after_forward": mode == "full_shard", "mp_policy": precision or MixedPrecisionPolicy()}
    for block in [m for m in module.modules() if type(m).__name__ in blocks]:
        fully_shard(block, **settings)
    fully_shard(module, **settings)
    return module


def full_state_dict(module: nn.Module, everywhere: bool = False, trained: bool = False) -> dict[str, torch.Tensor]:
    """The whole state dict of `module` (sharded or not; only its trained weights with `trained`) on the CPU, names
    as unsharded. Under FSDP every process must call it (it gathers); only the main process gets the tensors unless
    `everywhere`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere, ignore_frozen_params=trained)
    state = get_model_state_dict(module, options=options)
    return {name: value.cpu() for name, value in state.items()} if everywhere else state
