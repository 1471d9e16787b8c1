"""Judge scoring of swapped pairs: order-averaged soft labels from answer-position hidden states.

    swapped_pair_scores(hidden [M, P, 2, H], weight [V, H], option_ids=(id_A, id_B), bias=None,
                        aggregate="prob") -> PairScores

hidden[m, p, o] is the state at the answer position for pair m, principle p, order o (0: (A) = the first response,
1: swapped); label = P(first ≻ second) averages both orders (formulas: `swapped_pair_scores`). Exchanging the two
responses makes every label 1 − label, bit for bit (`complementary`; on the Triton path up to fp32 rounding). Only
the gap w_A − w_B of W is read, one dot product per row; inference only (no_grad), fp32 outputs, one kernel launch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import takes_triton
from ._validate import check_choice, check_head
from .logprobs import reference_logits

AGGREGATES = ("prob", "logodds")


class PairScores(NamedTuple):
    p_ab_a: torch.Tensor  # [M, P] P(option A) in order 0: the first response preferred
    p_ba_b: torch.Tensor  # [M, P] P(option B) in order 1: the first response preferred
    label: torch.Tensor  # [M, P] ½·(p_ab_a + p_ba_b) = P(first ≻ second)
    label_mean: torch.Tensor  # [M] aggregated over principles


def swapped_pair_scores(hidden: torch.Tensor, weight: torch.Tensor, option_ids: tuple[int, int],
                        bias: torch.Tensor | None = None, aggregate: str = "prob") -> PairScores:
    """Soft labels P(first ≻ second) of M pairs under P principles (see the module docstring).

    Order 0 shows "(A) = first response, (B) = second"; order 1 shows them swapped. With
    z_X = h·W[id_X] + b[id_X] and p(·) the softmax over the TWO option logits only:

        p_ab_a     = σ(z_A − z_B) at order 0        the first response, shown as (A)      [M, P]
        p_ba_b     = σ(z_B − z_A) at order 1        the first response again, now (B)     [M, P]
        label      = ½·(p_ab_a + p_ba_b)            P(first ≻ second)                     [M, P]
        label_mean = mean_p label                   aggregate="prob"                      [M]
                   = σ(mean_p logit(label))         aggregate="logodds"
    """
    op = "swapped_pair_scores"
    check_head(op, hidden, weight, bias, hidden_dims=4)
    if hidden.shape[2] != 2:
        raise ValueError(f"cai_fast.ops.{op}: hidden must be [M, P, 2 orders, H], got shape "
                         f"{tuple(hidden.shape)}")
    id_a, id_b = _option_pair(op, option_ids, weight.shape[0])
    check_choice(op, "aggregate", aggregate, AGGREGATES)
    with torch.no_grad():
        if takes_triton(hidden, weight, bias):
            from .kernels.swapped_pair import swapped_pair_forward

            return PairScores(*swapped_pair_forward(hidden, weight, bias, id_a, id_b,
                                                    aggregate == "logodds"))
        gap0, gap1 = _preference_gaps(hidden, weight, bias, id_a, id_b)
        return scores_from_gaps(gap0, gap1, aggregate)


def _option_pair(op: str, option_ids, vocab: int) -> tuple[int, int]:
    ids = [int(i) for i in option_ids]
    if len(ids) != 2 or ids[0] == ids[1] or not all(0 <= i < vocab for i in ids):
        raise ValueError(f"cai_fast.ops.{op}: option_ids must be two distinct token ids in "
                         f"[0, {vocab}), got {tuple(option_ids)!r}")
    return ids[0], ids[1]


def _preference_gaps(hidden, weight, bias, id_a, id_b):
    """Logit gaps favouring the first response: z_A − z_B at order 0, z_B − z_A at order 1."""
    w_gap = weight[id_a].float() - weight[id_b].float()
    gaps = (hidden.float() * w_gap).sum(-1)  # a row's sum in one order whatever the rows (a matrix-vector
    # product's blocking depends on how many rows it takes)
    if bias is not None:
        gaps += bias[id_a].float() - bias[id_b].float()
    return gaps[:, :, 0], -gaps[:, :, 1]


def _label_logit(gap0, gap1):
    """logit(½·(σ(gap0) + σ(gap1))) without leaving log space."""
    log_label = torch.logaddexp(F.logsigmoid(gap0), F.logsigmoid(gap1))
    return log_label - torch.logaddexp(F.logsigmoid(-gap0), F.logsigmoid(-gap1))


def complementary(mine: torch.Tensor, swapped: torch.Tensor) -> torch.Tensor:
    """A probability of the pair as given, from its value computed in this orientation (`mine`) and
    in the swapped one (`swapped`, ≈ 1 − mine): the larger of the two is kept as computed and the
    other side is 1 − it, exact in floating point for a value ≥ ½; 0.5 where they tie. So the swapped
    pair's result is 1 − this one's, bit for bit."""
    half = torch.full_like(mine, 0.5)
    return torch.where((mine > swapped) & (mine >= 0.5), mine,
                       torch.where((swapped > mine) & (swapped >= 0.5), 1 - swapped, half))


def _principle_mean(x: torch.Tensor) -> torch.Tensor:
    """[M, P] -> [M]: the principles added left to right, whatever M (torch's mean over a short last
    dimension is blocked by the number of rows)."""
    total = x[:, 0].clone()
    for column in x.unbind(1)[1:]:
        total += column
    return total / x.shape[1]


def _order_scores(gap0, gap1, aggregate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(label [M, P], label_mean [M]) of one orientation, in fp32, as computed before `complementary`."""
    label = 0.5 * (torch.sigmoid(gap0) + torch.sigmoid(gap1))
    if aggregate == "logodds":
        return label.float(), torch.sigmoid(_principle_mean(_label_logit(gap0, gap1))).float()
    return label.float(), _principle_mean(label).float()


def scores_from_gaps(gap0, gap1, aggregate: str) -> PairScores:
    """PairScores (fp32) from the two orders' logit gaps [M, P]. The swapped pair has the gaps
    (−gap1, −gap0); every probability is computed in both orientations and made `complementary`,
    so label(a, b) + label(b, a) = 1 exactly, in every dtype. The arithmetic runs in float64 and
    is rounded once: torch's vectorised and scalar sigmoid (taken by an element's place in its
    tensor) can differ in the last fp32 bit, not after rounding from float64."""
    gap0, gap1 = gap0.double(), gap1.double()
    sigmoid = lambda x: torch.sigmoid(x).float()  # noqa: E731
    p_ab_a = complementary(sigmoid(gap0), sigmoid(-gap0))
    p_ba_b = complementary(sigmoid(gap1), sigmoid(-gap1))
    label, mean = _order_scores(gap0, gap1, aggregate)
    swapped_label, swapped_mean = _order_scores(-gap1, -gap0, aggregate)
    label = complementary(label, swapped_label)
    if aggregate == "prob":  # the mean of the exact labels, in both orientations
        mean, swapped_mean = _principle_mean(label), _principle_mean(1 - label)
    return PairScores(p_ab_a, p_ba_b, label, complementary(mean, swapped_mean))


def swapped_pair_scores_reference(hidden, weight, option_ids, bias=None, aggregate="prob"):
    """Unfused scoring: full-vocabulary log-softmax, then the two options renormalised."""
    m, p, _, h = hidden.shape
    logp = torch.log_softmax(reference_logits(hidden.reshape(-1, h), weight, bias), dim=-1)
    pair = logp[:, list(option_ids)].reshape(m, p, 2, 2)
    probs = torch.softmax(pair, dim=-1)
    p_ab_a, p_ba_b = probs[:, :, 0, 0], probs[:, :, 1, 1]
    label = 0.5 * (p_ab_a + p_ba_b)
    mean = torch.sigmoid(torch.logit(label).mean(1)) if aggregate == "logodds" else label.mean(1)
    return PairScores(p_ab_a, p_ba_b, label, mean)
