"""The engine under every vocabulary op: h·Wᵀ a chunk of rows at a time, never [N, V].

For each row n of hidden [N, H] and the LM head weight [V, H] (optional bias [V]), with z = (h_n·Wᵀ + b) / T,
it returns lse_n = log Σ_v exp z_v, zsel_n = z[ids_n] (K gathered logits: the target, or the option tokens) and
zmean_n = Σ_v z_v / V (for label smoothing). Every vocabulary op is a function of these three, so its gradient
in z is dz_v = a_n·softmax(z)_v + c_n + Σ_k b_nk·[v = ids_nk], which a backend writes in place over the logits
tile; dh, dW and db follow by two matmuls per chunk. Peak memory is one [chunk_rows, V] fp32 tile plus the fp32
dW accumulator, whatever N (see chunk_rows_for). A backend is a module with `row_stats(z, ids)` and
`row_grad_(z, ids, lse, a, b, c)` on an fp32 tile z [n, V]: this module, or `kernels/vocab_rows.py` (Triton).
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple

import torch

from ._dispatch import current_settings, next_power_of_2, takes_triton
from .invariant import invariant_linear


class VocabStats(NamedTuple):
    lse: torch.Tensor  # [N] fp32
    zsel: torch.Tensor  # [N, K] fp32
    zmean: torch.Tensor  # [N] fp32


class VocabGrads(NamedTuple):
    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


Coefficients = Callable[[slice, VocabStats], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


LSE_ROWS = 32  # rows of the tile the torch backend exponentiates at once


def row_stats(z: torch.Tensor, ids: torch.Tensor) -> VocabStats:
    """Torch backend: lse, gathered logits and mean of each row of the fp32 tile z [n, V].

    The log-sum-exp exponentiates LSE_ROWS rows at a time into one reused buffer, so its only
    temporary is [LSE_ROWS, V] (torch.logsumexp would make a second tile, and many temporaries
    of a few MB leave freed memory behind in the C heap)."""
    row_max = z.amax(dim=1, keepdim=True)
    buffer = torch.empty_like(z[:LSE_ROWS])
    sums = torch.empty_like(row_max[:, 0])
    for start in range(0, len(z), LSE_ROWS):
        rows = slice(start, start + LSE_ROWS)
        shifted = torch.sub(z[rows], row_max[rows], out=buffer[: len(z[rows])])
        sums[rows] = shifted.exp_().sum(dim=1)
    return VocabStats(row_max[:, 0] + sums.log(), z.gather(1, ids), z.mean(dim=1))


def row_grad_(z, ids, lse, a, b, c) -> None:
    """Torch backend: overwrite z [n, V] with a·exp(z − lse) + c + Σ_k b_k·onehot(ids_k)."""
    z.sub_(lse[:, None]).exp_().mul_(a[:, None]).add_(c[:, None])
    z.scatter_add_(1, ids, b)


def _backend(*tensors):
    if takes_triton(*tensors):
        from .kernels import vocab_rows

        return vocab_rows
    return sys.modules[__name__]


TILE_BYTES = 256 * 2**20  # the most one fp32 tile of logits may take


def chunk_rows_for(n_rows: int, vocab: int) -> int:
    """Rows per tile: the forced value, else an eighth of the rows (so a tile is at most an eighth
    of the logits) but no more than TILE_BYTES of fp32, and at least 64 rows so that the matmuls
    stay efficient; at least 1, so that no rows make no chunks."""
    forced = current_settings().chunk_rows
    if forced:
        return forced
    rows = min(next_power_of_2(n_rows) // 8, TILE_BYTES // (4 * vocab))
    return max(1, min(n_rows, max(64, rows)))


def _row_chunks(n_rows: int, vocab: int) -> list[slice]:
    step = chunk_rows_for(n_rows, vocab)
    return [slice(start, min(n_rows, start + step)) for start in range(0, n_rows, step)]


def _logits_tile(hidden, weight, bias, inv_t: float, rows: slice) -> torch.Tensor:
    """z = (h·Wᵀ + b)·inv_t for one chunk of rows, as an fp32 tile."""
    z = invariant_linear(hidden[rows], weight).float()  # a row's logits whatever the tile's rows
    if bias is not None:
        z += bias.float()
    if inv_t != 1.0:
        z *= inv_t
    return z


def _empty_grads(hidden, weight, bias, needs: tuple[bool, bool, bool]) -> VocabGrads:
    f32 = dict(device=hidden.device, dtype=torch.float32)
    return VocabGrads(
        torch.empty_like(hidden) if needs[0] else None,
        torch.zeros(weight.shape, **f32) if needs[1] else None,
        torch.zeros(bias.shape, **f32) if bias is not None and needs[2] else None,
    )


def _accumulate(grads: VocabGrads, rows, dz, hidden, weight) -> None:
    """Add one tile's dz (w.r.t. the raw logits h·Wᵀ + b) into the gradient buffers."""
    if grads.bias is not None:
        grads.bias.add_(dz.sum(dim=0))
    dz = dz.to(weight.dtype)
    if grads.hidden is not None:
        grads.hidden[rows] = dz @ weight
    if grads.weight is not None and grads.weight.dtype == dz.dtype:
        grads.weight.addmm_(dz.T, hidden[rows])
    elif grads.weight is not None:
        grads.weight.add_(dz.T @ hidden[rows])


def _finish(grads: VocabGrads, weight, bias) -> VocabGrads:
    """Cast the fp32 accumulators back to the parameters' dtypes."""
    return VocabGrads(
        grads.hidden,
        None if grads.weight is None else grads.weight.to(weight.dtype),
        None if grads.bias is None else grads.bias.to(bias.dtype),
    )


def vocab_stats(hidden, weight, bias, ids, inv_t: float,
                coefficients: Coefficients | None = None, needs=(True, True, True)):
    """Statistics of every row; with `coefficients(rows, stats) -> (a, b, c)` (the gradient of
    the caller's loss w.r.t. lse, zsel, zmean on those rows) also the gradients, in the same pass.

    Returns (VocabStats, VocabGrads | None).
    """
    backend = _backend(hidden, weight, bias)
    n_rows, k = ids.shape
    f32 = dict(device=hidden.device, dtype=torch.float32)
    stats = VocabStats(torch.empty(n_rows, **f32), torch.empty(n_rows, k, **f32),
                       torch.empty(n_rows, **f32))
    grads = _empty_grads(hidden, weight, bias, needs) if coefficients else None
    for rows in _row_chunks(n_rows, weight.shape[0]):
        z = _logits_tile(hidden, weight, bias, inv_t, rows)
        chunk = VocabStats(*backend.row_stats(z, ids[rows]))
        for out, part in zip(stats, chunk):
            out[rows] = part
        if grads is not None:
            a, b, c = coefficients(rows, chunk)
            backend.row_grad_(z, ids[rows], chunk.lse, a * inv_t, b * inv_t, c * inv_t / z.shape[1])
            _accumulate(grads, rows, z, hidden, weight)
        del z  # free this tile before the next one is made: one tile alive at a time
    return stats, None if grads is None else _finish(grads, weight, bias)


def vocab_grads(hidden, weight, bias, ids, inv_t: float, lse, g: VocabStats, needs) -> VocabGrads:
    """Gradients of Σ_n g.lse_n·lse_n + g.zsel_n·zsel_n + g.zmean_n·zmean_n, recomputing each
    tile from hidden and weight (the backward of VocabStatsFunction)."""
    backend = _backend(hidden, weight, bias)
    grads = _empty_grads(hidden, weight, bias, needs)
    for rows in _row_chunks(hidden.shape[0], weight.shape[0]):
        z = _logits_tile(hidden, weight, bias, inv_t, rows)
        backend.row_grad_(z, ids[rows], lse[rows], g.lse[rows] * inv_t, g.zsel[rows] * inv_t,
                          g.zmean[rows] * (inv_t / z.shape[1]))
        _accumulate(grads, rows, z, hidden, weight)
        del z  # as in vocab_stats
    return _finish(grads, weight, bias)


class VocabStatsFunction(torch.autograd.Function):
    """(lse, zsel, zmean) of every row as a differentiable function of hidden, weight, bias.

    Backward recomputes the tiles chunk by chunk, so nothing of size [N, V] is ever saved.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, inv_t):
        stats, _ = vocab_stats(hidden, weight, bias, ids, inv_t)
        ctx.save_for_backward(hidden, weight, bias, ids, stats.lse)
        ctx.inv_t = inv_t
        return tuple(stats)

    @staticmethod
    def backward(ctx, g_lse, g_zsel, g_zmean):
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        g = VocabStats(g_lse.float(), g_zsel.float(), g_zmean.float())
        grads = vocab_grads(hidden, weight, bias, ids, ctx.inv_t, lse, g, ctx.needs_input_grad[:3])
        return grads.hidden, grads.weight, grads.bias, None, None
