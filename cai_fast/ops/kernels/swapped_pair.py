"""Triton kernel of swapped_pair_scores (contract in `cai_fast.ops.swapped_pair`).

One program per pair m: it reads the 2·P answer-position rows of that pair in blocks of BLOCK_H
hidden units, dots them with the option gap w_A − w_B, and writes p_ab_a, p_ba_b, the labels
and their principle aggregate. Everything in fp32; the whole score in one launch.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import block_for, next_power_of_2
from ._math import log_add_exp, log_sigmoid

MAX_BLOCK_H = 256


@triton.jit
def _swapped_pair_kernel(h_ptr, stride_m, stride_p, stride_o, w_ptr, w_stride, bias_ptr,
                         id_a, id_b, p_ab_a_ptr, p_ba_b_ptr, label_ptr, mean_ptr, P, H,
                         HAS_BIAS: tl.constexpr, LOGODDS: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """Scores of pair m = program id.

    h_ptr: hidden [M, P, 2, H] with strides stride_m, stride_p, stride_o and 1 along H.
    w_ptr: LM head [V, H], rows w_stride apart; bias_ptr: [V] (read only if HAS_BIAS).
    id_a, id_b: vocabulary ids of the options (A) and (B).
    p_ab_a_ptr, p_ba_b_ptr, label_ptr: fp32 [M, P] outputs; mean_ptr: fp32 [M] output.
    P, H: principles and hidden size; LOGODDS: aggregate by mean log-odds instead of mean prob.
    BLOCK_P ≥ P and BLOCK_H: block sizes (powers of two).
    """
    m = tl.program_id(0).to(tl.int64)
    ps = tl.arange(0, BLOCK_P)
    p_mask = ps < P
    gap0 = tl.zeros([BLOCK_P], dtype=tl.float32)
    gap1 = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, H, BLOCK_H):
        hs = start + tl.arange(0, BLOCK_H)
        h_mask = hs < H
        w_a = tl.load(w_ptr + id_a.to(tl.int64) * w_stride + hs, mask=h_mask, other=0.0).to(tl.float32)
        w_b = tl.load(w_ptr + id_b.to(tl.int64) * w_stride + hs, mask=h_mask, other=0.0).to(tl.float32)
        rows = h_ptr + m * stride_m + ps[:, None] * stride_p + hs[None, :]
        mask = p_mask[:, None] & h_mask[None, :]
        h0 = tl.load(rows, mask=mask, other=0.0).to(tl.float32)
        h1 = tl.load(rows + stride_o, mask=mask, other=0.0).to(tl.float32)
        gap0 += tl.sum(h0 * (w_a - w_b)[None, :], axis=1)
        gap1 -= tl.sum(h1 * (w_a - w_b)[None, :], axis=1)
    if HAS_BIAS:
        b_gap = tl.load(bias_ptr + id_a).to(tl.float32) - tl.load(bias_ptr + id_b).to(tl.float32)
        gap0 += b_gap
        gap1 -= b_gap
    p_ab_a = tl.exp(log_sigmoid(gap0))
    p_ba_b = tl.exp(log_sigmoid(gap1))
    label = 0.5 * (p_ab_a + p_ba_b)
    tl.store(p_ab_a_ptr + m * P + ps, p_ab_a, mask=p_mask)
    tl.store(p_ba_b_ptr + m * P + ps, p_ba_b, mask=p_mask)
    tl.store(label_ptr + m * P + ps, label, mask=p_mask)
    if LOGODDS:
        logit = log_add_exp(log_sigmoid(gap0), log_sigmoid(gap1)) \
            - log_add_exp(log_sigmoid(-gap0), log_sigmoid(-gap1))
        mean_logit = tl.sum(tl.where(p_mask, logit, 0.0), axis=0) / P
        tl.store(mean_ptr + m, tl.exp(log_sigmoid(mean_logit)))
    else:
        tl.store(mean_ptr + m, tl.sum(tl.where(p_mask, label, 0.0), axis=0) / P)


def swapped_pair_forward(hidden, weight, bias, id_a: int, id_b: int, logodds: bool):
    """(p_ab_a, p_ba_b, label, label_mean) of hidden [M, P, 2, H]; one launch."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n_pairs, n_principles, _, size = hidden.shape
    f32 = dict(device=hidden.device, dtype=torch.float32)
    p_ab_a, p_ba_b, label = (torch.empty(n_pairs, n_principles, **f32) for _ in range(3))
    label_mean = torch.empty(n_pairs, **f32)
    _swapped_pair_kernel[(n_pairs,)](
        hidden, hidden.stride(0), hidden.stride(1), hidden.stride(2), weight, weight.stride(0),
        weight if bias is None else bias, id_a, id_b, p_ab_a, p_ba_b, label, label_mean,
        n_principles, size, HAS_BIAS=bias is not None, LOGODDS=logodds,
        BLOCK_P=next_power_of_2(n_principles), BLOCK_H=block_for(size, MAX_BLOCK_H))
    return p_ab_a, p_ba_b, label, label_mean
