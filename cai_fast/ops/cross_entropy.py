"""Fused linear cross-entropy for SFT: the loss of h·Wᵀ against targets without [N, V] logits.

    fused_linear_cross_entropy(hidden [N, H], weight [V, H], targets [N], bias=None, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, reduction="mean") -> loss (fp32)

Per token whose target is not ignore_index, with z = h·Wᵀ + b and lse = log Σ_v exp z_v:
ℓ = (1 − ε)·(lse − z_target) + ε·(lse − mean_v z_v) + z_loss·lse² (ε = label_smoothing, torch's definition;
z-loss as in PaLM). "mean" divides Σℓ by the non-ignored tokens (all ignored: 0 and zero gradients, never NaN),
"sum" returns Σℓ, "none" the [N] vector (ignored tokens 0). All math is fp32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses

import torch

from ._validate import check_choice, check_head, check_token_ids
from ._vocab import VocabStats, VocabStatsFunction, vocab_stats
from .logprobs import reference_logits

REDUCTIONS = ("mean", "sum", "none")


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    reduction: str = "mean"


def _row_weights(targets, options: CrossEntropyOptions):
    """Per-row weight of the loss (0 for ignored rows, 1/#valid for "mean") and safe target ids."""
    valid = targets != options.ignore_index
    weights = valid.float()
    if options.reduction == "mean":
        weights /= valid.sum().clamp(min=1)
    return weights, torch.where(valid, targets, 0)[:, None]


def token_losses(stats: VocabStats, weights, options: CrossEntropyOptions) -> torch.Tensor:
    """weights·ℓ for each row, from lse, the target logit and the mean logit."""
    eps, lse = options.label_smoothing, stats.lse
    loss = (1 - eps) * (lse - stats.zsel[:, 0]) + eps * (lse - stats.zmean)
    return weights * (loss + options.z_loss * lse * lse)


def _loss_gradients(stats: VocabStats, weights, options: CrossEntropyOptions):
    """d(weights·ℓ) / d(lse, z_target, zmean) for each row: the engine's (a, b, c)."""
    eps = options.label_smoothing
    a = weights * (1 + 2 * options.z_loss * stats.lse)
    return a, -(1 - eps) * weights[:, None], -eps * weights


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Scalar ("mean" / "sum") loss; gradients made in forward, scaled by grad_output in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options):
        weights, ids = _row_weights(targets, options)

        def coefficients(rows, chunk):
            return _loss_gradients(chunk, weights[rows], options)

        needs = ctx.needs_input_grad[:3]
        stats, grads = vocab_stats(hidden, weight, bias, ids, 1.0, coefficients, needs)
        ctx.save_for_backward(*grads)
        return token_losses(stats, weights, options).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if getattr(ctx, "used", False):
            raise RuntimeError("cai_fast.ops.fused_linear_cross_entropy: backward ran twice on one "
                               "forward (retain_graph); run the forward again instead")
        ctx.used = True
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        return (*scaled, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0,
                               reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (hidden·weightᵀ + bias) against targets, chunked over rows (see module doc).

    hidden [N, H], weight [V, H], targets [N] int64 in [0, V) or ignore_index, bias [V] or None.
    Returns a scalar for "mean" / "sum", [N] for "none"; fp32.

    With "mean"/"sum" the gradients are computed during the forward pass, chunk by chunk (the
    gradient of a scalar loss is known as soon as lse is), and backward only scales them: three
    matmuls in all, like the unfused loss, and a peak of one [chunk, V] tile plus the gradients.
    "none" goes through VocabStatsFunction, whose backward recomputes each tile.
    """
    op = "fused_linear_cross_entropy"
    check_head(op, hidden, weight, bias)
    check_token_ids(op, "targets", targets, hidden, hidden.shape[:1], weight.shape[0], ignore_index)
    check_choice(op, "reduction", reduction, REDUCTIONS)
    if not 0.0 <= label_smoothing <= 1.0 or z_loss < 0:
        raise ValueError(f"cai_fast.ops.{op}: label_smoothing must be in [0, 1] and z_loss >= 0, "
                         f"got label_smoothing={label_smoothing!r}, z_loss={z_loss!r}")
    options = CrossEntropyOptions(ignore_index, float(label_smoothing), float(z_loss), reduction)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if reduction != "none" and wants_grad:
        return FusedLinearCrossEntropyFunction.apply(hidden, weight, bias, targets, options)
    weights, ids = _row_weights(targets, options)
    stats = VocabStats(*VocabStatsFunction.apply(hidden, weight, bias, ids, 1.0))
    losses = token_losses(stats, weights, options)
    return losses if reduction == "none" else losses.sum()


def fused_linear_cross_entropy_reference(hidden, weight, targets, bias=None, ignore_index=-100,
                                         label_smoothing=0.0, z_loss=0.0, reduction="mean"):
    """Unfused loss: the [N, V] logits and log-softmax, then the same formula."""
    logits = reference_logits(hidden, weight, bias)
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    nll = -logp.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    lse = torch.logsumexp(logits, dim=-1)
    loss = (1 - label_smoothing) * nll - label_smoothing * logp.mean(dim=-1) + z_loss * lse**2
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() / (valid.sum().clamp(min=1) if reduction == "mean" else 1)
