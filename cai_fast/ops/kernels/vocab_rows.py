"""Triton backend of the vocabulary engine (`cai_fast.ops._vocab`): row kernels over a logits tile.

The tile z [n, V] (fp32, rows contiguous) is h·Wᵀ for one chunk of rows, already biased and
scaled by 1/T. One program per row walks the vocabulary in blocks of BLOCK columns:
`_row_stats_kernel` keeps an online log-sum-exp (running max and rescaled sum), the running sum
and gathers K selected logits; `_row_grad_kernel` overwrites the row with
dz = a·exp(z − lse) + c + Σ_k b_k·[v = ids_k]. Same contract as the torch functions of _vocab.py.
"""

import torch
import triton
import triton.language as tl

from .._dispatch import block_for, next_power_of_2

MAX_BLOCK = 4096


@triton.jit
def _row_stats_kernel(z_ptr, z_stride, ids_ptr, ids_stride, lse_ptr, zsel_ptr, zmean_ptr,
                      n_cols, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row: log-sum-exp, mean, and the K logits at ids.

    z_ptr: fp32 tile [n, n_cols]; z_stride: elements between rows.
    ids_ptr: int64 [n, K] vocabulary ids (row stride ids_stride, may be 0 for shared ids).
    lse_ptr, zmean_ptr: fp32 [n] outputs; zsel_ptr: fp32 [n, K] output (contiguous).
    n_cols: V; K: ids per row; BLOCK: columns per step; BLOCK_K: a power of two ≥ K.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    running_max = float("-inf")
    running_sum = 0.0
    total = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(z_row + cols, mask=cols < n_cols, other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        total += tl.sum(tl.where(cols < n_cols, x, 0.0), axis=0)
        running_max = new_max
    tl.store(lse_ptr + row, running_max + tl.log(running_sum))
    tl.store(zmean_ptr + row, total / n_cols)
    ks = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + row * ids_stride + ks, mask=ks < K, other=0)
    tl.store(zsel_ptr + row * K + ks, tl.load(z_row + ids, mask=ks < K), mask=ks < K)


@triton.jit
def _row_grad_kernel(z_ptr, z_stride, ids_ptr, ids_stride, lse_ptr, a_ptr, b_ptr, c_ptr,
                     n_cols, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row: overwrite z with dz = a·exp(z − lse) + c + Σ_k b_k·[col = ids_k].

    z_ptr, z_stride, ids_ptr, ids_stride, n_cols, K, BLOCK, BLOCK_K: as in _row_stats_kernel.
    lse_ptr, a_ptr, c_ptr: fp32 [n]; b_ptr: fp32 [n, K] (contiguous). Repeated ids add up.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    c = tl.load(c_ptr + row)
    ks = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + row * ids_stride + ks, mask=ks < K, other=-1)
    b = tl.load(b_ptr + row * K + ks, mask=ks < K, other=0.0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(z_row + cols, mask=cols < n_cols, other=0.0)
        hits = tl.sum(tl.where(cols[:, None] == ids[None, :], b[None, :], 0.0), axis=1)
        tl.store(z_row + cols, a * tl.exp(x - lse) + c + hits, mask=cols < n_cols)


def _launch_shape(z: torch.Tensor, ids: torch.Tensor) -> dict:
    n_cols = z.shape[1]
    return dict(n_cols=n_cols, K=ids.shape[1], BLOCK=block_for(n_cols, MAX_BLOCK),
                BLOCK_K=max(2, next_power_of_2(ids.shape[1])))


def row_stats(z: torch.Tensor, ids: torch.Tensor):
    """lse [n], zsel [n, K], zmean [n] of the fp32 tile z [n, V] at int64 ids [n, K]."""
    n_rows, k = ids.shape
    lse = torch.empty(n_rows, device=z.device, dtype=torch.float32)
    zmean = torch.empty_like(lse)
    zsel = torch.empty(n_rows, k, device=z.device, dtype=torch.float32)
    _row_stats_kernel[(n_rows,)](z, z.stride(0), ids, ids.stride(0), lse, zsel, zmean,
                                 **_launch_shape(z, ids))
    return lse, zsel, zmean


def row_grad_(z, ids, lse, a, b, c) -> None:
    """Overwrite z [n, V] in place with a·exp(z − lse) + c + Σ_k b_k·onehot(ids_k)."""
    _row_grad_kernel[(z.shape[0],)](z, z.stride(0), ids, ids.stride(0), lse.contiguous(),
                                    a.contiguous(), b.contiguous(), c.contiguous(),
                                    **_launch_shape(z, ids))
