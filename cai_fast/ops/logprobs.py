"""Log-probs of chosen tokens straight from hidden states and the LM head (PPO, DPO, the judge).

    linear_logprobs(hidden [N, H], weight [V, H], targets [N], bias=None, temperature=1.0)
        -> logp [N] fp32 = log softmax((h·Wᵀ + b) / T)[target]
    linear_option_logprobs(hidden, weight, options [K] or [N, K], bias=None, temperature=1.0)
        -> (logp [N, K] fp32 under the full-vocabulary softmax, lse [N] fp32)

Both are differentiable in hidden, weight and bias; the [N, V] logits never exist (`_vocab.py`: a chunk of rows at
a time, recomputed in backward; Triton on CUDA, torch elsewhere). `*_reference` materialise them, for the tests.
"""

from __future__ import annotations

import torch

from ._validate import check_head, check_temperature, check_token_ids
from ._vocab import VocabStatsFunction


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """log softmax((hidden·weightᵀ + bias) / temperature)[targets], shape [N], fp32.

    hidden [N, H], weight [V, H], targets [N] int64 in [0, V), bias [V] or None.
    """
    check_head("linear_logprobs", hidden, weight, bias)
    check_token_ids("linear_logprobs", "targets", targets, hidden, hidden.shape[:1],
                    weight.shape[0])
    check_temperature("linear_logprobs", temperature)
    lse, zsel, _ = VocabStatsFunction.apply(hidden, weight, bias, targets[:, None], 1.0 / temperature)
    return zsel[:, 0] - lse


def linear_option_logprobs(hidden: torch.Tensor, weight: torch.Tensor, options: torch.Tensor,
                           bias: torch.Tensor | None = None, temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-probs of K option tokens per row, and the log-sum-exp.

    hidden [N, H], weight [V, H], options [K] (the same for every row) or [N, K] int64,
    bias [V] or None. Returns (logp [N, K] fp32, lse [N] fp32).
    """
    check_head("linear_option_logprobs", hidden, weight, bias)
    check_temperature("linear_option_logprobs", temperature)
    n_rows = hidden.shape[0]
    if options.dim() not in (1, 2):
        raise ValueError("cai_fast.ops.linear_option_logprobs: options must be [K] or [N, K], "
                         f"got shape {tuple(options.shape)}")
    shape = options.shape if options.dim() == 1 else (n_rows, options.shape[1])
    check_token_ids("linear_option_logprobs", "options", options, hidden, shape, weight.shape[0])
    ids = options.contiguous().expand(n_rows, -1) if options.dim() == 1 else options.contiguous()
    lse, zsel, _ = VocabStatsFunction.apply(hidden, weight, bias, ids, 1.0 / temperature)
    return zsel - lse[:, None], lse


def reference_logits(hidden, weight, bias=None, temperature=1.0) -> torch.Tensor:
    """Full [N, V] logits (h·Wᵀ + b) / T in at least fp32: the unfused way."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature


def linear_logprobs_reference(hidden, weight, targets, bias=None, temperature=1.0):
    """Unfused linear_logprobs: materialises the [N, V] log-softmax."""
    logp = torch.log_softmax(reference_logits(hidden, weight, bias, temperature), dim=-1)
    return logp.gather(1, targets[:, None])[:, 0]


def linear_option_logprobs_reference(hidden, weight, options, bias=None, temperature=1.0):
    """Unfused linear_option_logprobs: materialises the [N, V] logits."""
    logits = reference_logits(hidden, weight, bias, temperature)
    lse = torch.logsumexp(logits, dim=-1)
    ids = options.expand(hidden.shape[0], -1) if options.dim() == 1 else options
    return logits.gather(1, ids) - lse[:, None], lse
