"""Argument checks of the public ops: each message names the op, the argument and what was given."""

from __future__ import annotations

import torch


def _fail(op: str, message: str):
    raise ValueError(f"cai_fast.ops.{op}: {message}")


def check_head(op: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               hidden_dims: int = 2) -> None:
    """hidden [..., H] with `hidden_dims` dims, weight [V, H], bias [V] or None; same dtype/device."""
    if hidden.dim() != hidden_dims:
        _fail(op, f"hidden must have {hidden_dims} dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        _fail(op, f"weight must be [V, H={hidden.shape[-1]}] like the LM head, got shape "
                  f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        _fail(op, f"bias must be [V={weight.shape[0]}] or None, got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            _fail(op, f"{name} is {t.dtype} on {t.device} but hidden is {hidden.dtype} on "
                      f"{hidden.device}; cast them to one dtype and device")
    if not hidden.is_floating_point():
        _fail(op, f"hidden must be a floating tensor, got {hidden.dtype}")


def check_token_ids(op: str, name: str, ids: torch.Tensor, hidden: torch.Tensor, shape: tuple,
                    vocab: int, ignore_index: int | None = None) -> None:
    """ids: int64 of `shape` on hidden's device, each in [0, vocab) unless equal to ignore_index."""
    if ids.dtype != torch.int64 or tuple(ids.shape) != tuple(shape):
        _fail(op, f"{name} must be int64 of shape {tuple(shape)}, got {ids.dtype} of shape "
                  f"{tuple(ids.shape)}")
    if ids.device != hidden.device:
        _fail(op, f"{name} is on {ids.device} but hidden is on {hidden.device}; move them together")
    bad = (ids < 0) | (ids >= vocab)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        allowed = f"[0, {vocab})" + ("" if ignore_index is None else f" or {ignore_index}")
        _fail(op, f"{name}{list(where)} = {int(ids[where])} is outside the vocabulary; ids must "
                  f"be in {allowed}")


def check_temperature(op: str, temperature: float) -> None:
    if not temperature > 0:
        _fail(op, f"temperature must be > 0, got {temperature!r}")


def check_choice(op: str, name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        _fail(op, f"{name} must be one of {choices}, got {value!r}")
