"""Where models run and in what precision: the one place `--device` and `--dtype` are resolved.

    resolve(device="auto", dtype="auto") -> (torch.device, torch.dtype)

device: "auto" (CUDA when there is one, else the CPU), "cpu", "cuda" or "cuda:N". dtype: "auto",
"float32", "bfloat16" or "float16"; "auto" is bf16 where the hardware multiplies bf16 natively
(CUDA; CPUs with AMX or AVX512-BF16), else fp32. A device that does not exist raises `DeviceError`
(a ValueError) before anything loads. Only the weights and the KV pool take this precision:
log-probs, losses and labels are fp32 whatever it is.
"""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(ValueError):
    """A --device or --dtype that cannot be used here; the message says what to pass instead."""


def resolve(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype that `device` and `dtype` (the CLI's strings) stand for here."""
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where)


def resolved_names(device: str = "auto", dtype: str = "auto") -> dict[str, str]:
    """{"device": ..., "dtype": ...} as chosen here (e.g. "cpu", "bfloat16"), for run configs and reports."""
    where, chosen = resolve(device, dtype)
    return {"device": str(where), "dtype": dtype_name(chosen)}


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" of torch.bfloat16: the name --dtype takes and run configs record."""
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str) -> torch.device:
    """torch.device of "auto", "cpu", "cuda" or "cuda:N"; DeviceError when it does not exist here."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise DeviceError(f"--device {device!r} is not a device; use one of {', '.join(DEVICES)}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"--device {device!r}: this machine has no CUDA device; use --device cpu (or auto)")
    if index and int(index) >= count:
        raise DeviceError(f"--device {device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device(name)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """torch dtype of "auto" (see the module docstring), "float32", "bfloat16" or "float16"."""
    name = str(dtype).strip().lower()
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"--dtype {dtype!r} is not a dtype; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA device that supports it (Ampere on), or a
    CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(
        getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
