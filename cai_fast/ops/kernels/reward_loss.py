"""Triton kernels of reward_bt_loss (contract in `cai_fast.ops.reward_loss`).

Forward: one program per block of BLOCK_B pairs computes both rewards (the head's dot products,
walking H in blocks), the soft-label Bradley–Terry loss and its slope σ(d) − p. Backward: one
program per (pair block, hidden block) writes dh = dr·w for both sides and a partial dw for its
pairs; the partials are summed in torch. fp32 throughout.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import block_for
from ._math import log_sigmoid

MAX_BLOCK_H = 256
BLOCK_B = 16


@triton.jit
def _bt_forward_kernel(hc_ptr, hr_ptr, stride_c, stride_r, w_ptr, bias_ptr, p_ptr, margin_ptr,
                       rc_ptr, rr_ptr, loss_ptr, slope_ptr, B, H,
                       BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rewards, loss and slope of pairs [pid·BLOCK_B, (pid+1)·BLOCK_B).

    hc_ptr, hr_ptr: chosen / rejected states [B, H], rows stride_c / stride_r apart, unit stride
    along H. w_ptr: head weight [H]; bias_ptr: fp32 scalar. p_ptr, margin_ptr: fp32 [B] soft labels
    and margins. rc_ptr, rr_ptr, loss_ptr, slope_ptr: fp32 [B] outputs. B, H: sizes.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    r_c = tl.zeros([BLOCK_B], dtype=tl.float32)
    r_r = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        hs = start + tl.arange(0, BLOCK_H)
        mask = row_mask[:, None] & (hs < H)[None, :]
        w = tl.load(w_ptr + hs, mask=hs < H, other=0.0).to(tl.float32)[None, :]
        h_c = tl.load(hc_ptr + rows[:, None] * stride_c + hs[None, :], mask=mask, other=0.0)
        h_r = tl.load(hr_ptr + rows[:, None] * stride_r + hs[None, :], mask=mask, other=0.0)
        r_c += tl.sum(h_c.to(tl.float32) * w, axis=1)
        r_r += tl.sum(h_r.to(tl.float32) * w, axis=1)
    bias = tl.load(bias_ptr)
    r_c += bias
    r_r += bias
    p = tl.load(p_ptr + rows, mask=row_mask, other=0.0)
    d = r_c - r_r - tl.load(margin_ptr + rows, mask=row_mask, other=0.0)
    tl.store(rc_ptr + rows, r_c, mask=row_mask)
    tl.store(rr_ptr + rows, r_r, mask=row_mask)
    tl.store(loss_ptr + rows, -(p * log_sigmoid(d) + (1.0 - p) * log_sigmoid(-d)), mask=row_mask)
    tl.store(slope_ptr + rows, tl.exp(log_sigmoid(d)) - p, mask=row_mask)


@triton.jit
def _bt_backward_kernel(hc_ptr, hr_ptr, stride_c, stride_r, w_ptr, drc_ptr, drr_ptr,
                        dhc_ptr, dhr_ptr, dw_part_ptr, B, H,
                        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Gradients of pair block pid0 on hidden block pid1.

    hc_ptr, hr_ptr, stride_c, stride_r, w_ptr, B, H: as in _bt_forward_kernel.
    drc_ptr, drr_ptr: fp32 [B] dL/dr_chosen, dL/dr_rejected.
    dhc_ptr, dhr_ptr: fp32 [B, H] outputs (contiguous); dw_part_ptr: fp32 [cdiv(B, BLOCK_B), H]
    output, the pair block's share of dL/dw.
    """
    block = tl.program_id(0).to(tl.int64)
    rows = block * BLOCK_B + tl.arange(0, BLOCK_B)
    hs = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < B)[:, None] & (hs < H)[None, :]
    w = tl.load(w_ptr + hs, mask=hs < H, other=0.0).to(tl.float32)[None, :]
    dr_c = tl.load(drc_ptr + rows, mask=rows < B, other=0.0)[:, None]
    dr_r = tl.load(drr_ptr + rows, mask=rows < B, other=0.0)[:, None]
    h_c = tl.load(hc_ptr + rows[:, None] * stride_c + hs[None, :], mask=mask, other=0.0)
    h_r = tl.load(hr_ptr + rows[:, None] * stride_r + hs[None, :], mask=mask, other=0.0)
    tl.store(dhc_ptr + rows[:, None] * H + hs[None, :], dr_c * w, mask=mask)
    tl.store(dhr_ptr + rows[:, None] * H + hs[None, :], dr_r * w, mask=mask)
    dw = tl.sum(dr_c * h_c.to(tl.float32) + dr_r * h_r.to(tl.float32), axis=0)
    tl.store(dw_part_ptr + block * H + hs, dw, mask=hs < H)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def bt_forward(h_chosen, h_rejected, weight, bias, p, margin):
    """Rewards, per-pair losses and slopes (fp32 [B] each) in one launch."""
    h_chosen, h_rejected, weight = map(_unit_stride, (h_chosen, h_rejected, weight))
    n_rows, size = h_chosen.shape
    r_chosen, r_rejected, losses, slope = (
        torch.empty(n_rows, device=h_chosen.device, dtype=torch.float32) for _ in range(4))
    _bt_forward_kernel[(triton.cdiv(n_rows, BLOCK_B),)](
        h_chosen, h_rejected, h_chosen.stride(0), h_rejected.stride(0), weight, bias, p, margin,
        r_chosen, r_rejected, losses, slope, n_rows, size,
        BLOCK_B=BLOCK_B, BLOCK_H=block_for(size, MAX_BLOCK_H))
    return r_chosen, r_rejected, losses, slope


def bt_backward(h_chosen, h_rejected, weight, dr_chosen, dr_rejected):
    """dh_chosen, dh_rejected (fp32 [B, H]), dw (fp32 [H]) and db (fp32 []) from dL/dr."""
    h_chosen, h_rejected, weight = map(_unit_stride, (h_chosen, h_rejected, weight))
    n_rows, size = h_chosen.shape
    block_h = block_for(size, MAX_BLOCK_H)
    f32 = dict(device=h_chosen.device, dtype=torch.float32)
    dh_chosen, dh_rejected = torch.empty(n_rows, size, **f32), torch.empty(n_rows, size, **f32)
    dw_part = torch.empty(triton.cdiv(n_rows, BLOCK_B), size, **f32)
    _bt_backward_kernel[(triton.cdiv(n_rows, BLOCK_B), triton.cdiv(size, block_h))](
        h_chosen, h_rejected, h_chosen.stride(0), h_rejected.stride(0), weight,
        dr_chosen.contiguous(), dr_rejected.contiguous(), dh_chosen, dh_rejected, dw_part,
        n_rows, size, BLOCK_B=BLOCK_B, BLOCK_H=block_h)
    return dh_chosen, dh_rejected, dw_part.sum(0), (dr_chosen + dr_rejected).sum()
