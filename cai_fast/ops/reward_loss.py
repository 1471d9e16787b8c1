"""Bradley–Terry reward loss with soft labels, fused with the scalar reward head.

    reward_bt_loss(h_chosen [B, H], h_rejected [B, H], head_weight [H] or [1, H], head_bias [] or [1] or None,
                   p [B] or float, margin=None | float | [B], reduction="mean") -> (loss, r_chosen [B], r_rejected [B])

r = h·w + b on the final-token states; with d = r_chosen − r_rejected − margin, ℓ = −[p·log σ(d) + (1 − p)·log σ(−d)]
(dℓ/dd = σ(d) − p), written with log-sigmoid, so finite for any |d|. p (the judge's soft label P(chosen ≻ rejected))
and margin are data, not differentiated; gradients reach h_chosen, h_rejected, head_weight and head_bias, also through
the returned rewards. fp32 math, loss and rewards; the Triton path (`kernels/reward_loss.py`) fuses head and loss.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from ._dispatch import takes_triton
from ._validate import check_choice

REDUCTIONS = ("mean", "sum", "none")


def bt_forward(h_chosen, h_rejected, weight, bias, p, margin):
    """Torch path: rewards, per-pair losses and the slope σ(d) − p, all fp32 [B]."""
    w = weight.float()
    r_chosen = h_chosen.float() @ w + bias
    r_rejected = h_rejected.float() @ w + bias
    d = r_chosen - r_rejected - margin
    losses = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    return r_chosen, r_rejected, losses, torch.sigmoid(d) - p


def bt_backward(h_chosen, h_rejected, weight, dr_chosen, dr_rejected):
    """Torch path: grads to h_chosen, h_rejected, w (fp32 [H]) and b (fp32 []) from dL/dr."""
    w = weight.float()
    dw = dr_chosen @ h_chosen.float() + dr_rejected @ h_rejected.float()
    return dr_chosen[:, None] * w, dr_rejected[:, None] * w, dw, (dr_chosen + dr_rejected).sum()


def _implementation(*tensors):
    if takes_triton(*tensors):
        from .kernels import reward_loss

        return reward_loss
    return sys.modules[__name__]


class RewardBTFunction(torch.autograd.Function):
    """(per-pair loss, r_chosen, r_rejected) with the head fused in; p and margin are data."""

    @staticmethod
    def forward(ctx, h_chosen, h_rejected, weight, bias, p, margin):
        impl = _implementation(h_chosen, h_rejected, weight)
        bias32 = torch.zeros((), device=weight.device) if bias is None else bias.float().reshape(())
        r_chosen, r_rejected, losses, slope = impl.bt_forward(h_chosen, h_rejected, weight.reshape(-1),
                                                              bias32, p, margin)
        ctx.save_for_backward(h_chosen, h_rejected, weight, bias, slope)
        ctx.impl = impl
        return losses, r_chosen, r_rejected

    @staticmethod
    def backward(ctx, g_losses, g_chosen, g_rejected):
        h_chosen, h_rejected, weight, bias, slope = ctx.saved_tensors
        pull = g_losses.float() * slope
        dh_c, dh_r, dw, db = ctx.impl.bt_backward(h_chosen, h_rejected, weight.reshape(-1),
                                                  pull + g_chosen.float(), g_rejected.float() - pull)
        db = None if bias is None else db.reshape(bias.shape).to(bias.dtype)
        return (dh_c.to(h_chosen.dtype), dh_r.to(h_rejected.dtype),
                dw.reshape(weight.shape).to(weight.dtype), db, None, None)


def _as_rows(op: str, name: str, value, n_rows: int, device) -> torch.Tensor:
    """A float or [B] tensor as an fp32 [B] tensor on device."""
    rows = torch.as_tensor(value, dtype=torch.float32, device=device)
    if rows.dim() > 1 or rows.numel() not in (1, n_rows):
        raise ValueError(f"cai_fast.ops.{op}: {name} must be a float or a [B={n_rows}] tensor, got "
                         f"shape {tuple(rows.shape)}")
    return rows.expand(n_rows).contiguous()


def reward_bt_loss(h_chosen: torch.Tensor, h_rejected: torch.Tensor, head_weight: torch.Tensor,
                   head_bias: torch.Tensor | None, p, margin=None, reduction: str = "mean"):
    """Soft-label Bradley–Terry loss of a scalar head on final-token states (see module doc).

    Returns (loss: scalar for "mean" / "sum", [B] for "none"; r_chosen [B]; r_rejected [B]).
    """
    op = "reward_bt_loss"
    _check_reward_inputs(op, h_chosen, h_rejected, head_weight, head_bias)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    n_rows, device = h_chosen.shape[0], h_chosen.device
    p = _as_rows(op, "p", p, n_rows, device)
    if bool(((p < 0) | (p > 1) | p.isnan()).any()):
        raise ValueError(f"cai_fast.ops.{op}: p must be probabilities in [0, 1], got "
                         f"min {p.min().item()}, max {p.max().item()}")
    margin = _as_rows(op, "margin", 0.0 if margin is None else margin, n_rows, device)
    losses, r_chosen, r_rejected = RewardBTFunction.apply(h_chosen, h_rejected, head_weight,
                                                          head_bias, p, margin)
    return _reduce(losses, reduction), r_chosen, r_rejected


def _reduce(losses, reduction: str):
    if reduction == "none":
        return losses
    return losses.mean() if reduction == "mean" else losses.sum()


def _check_reward_inputs(op, h_chosen, h_rejected, head_weight, head_bias) -> None:
    if h_chosen.dim() != 2 or h_chosen.shape != h_rejected.shape:
        raise ValueError(f"cai_fast.ops.{op}: h_chosen and h_rejected must both be [B, H], got "
                         f"{tuple(h_chosen.shape)} and {tuple(h_rejected.shape)}")
    if head_weight.numel() != h_chosen.shape[1] or head_weight.dim() > 2:
        raise ValueError(f"cai_fast.ops.{op}: head_weight must be [H={h_chosen.shape[1]}] or "
                         f"[1, H], got shape {tuple(head_weight.shape)}")
    if head_bias is not None and head_bias.numel() != 1:
        raise ValueError(f"cai_fast.ops.{op}: head_bias must hold one value or be None, got "
                         f"shape {tuple(head_bias.shape)}")
    for name, t in (("h_rejected", h_rejected), ("head_weight", head_weight)):
        if t.dtype != h_chosen.dtype or t.device != h_chosen.device:
            raise ValueError(f"cai_fast.ops.{op}: {name} is {t.dtype} on {t.device} but h_chosen "
                             f"is {h_chosen.dtype} on {h_chosen.device}")


def reward_bt_loss_reference(h_chosen, h_rejected, head_weight, head_bias, p, margin=None,
                             reduction="mean"):
    """Plain autograd version: nn.Linear-style head, then the log-sigmoid loss."""
    w = head_weight.reshape(-1)
    bias = 0.0 if head_bias is None else head_bias.reshape(())
    r_chosen, r_rejected = h_chosen @ w + bias, h_rejected @ w + bias
    d = r_chosen - r_rejected - (0.0 if margin is None else margin)
    losses = -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))
    return _reduce(losses, reduction), r_chosen, r_rejected
