"""Fused ops of cai_fast: LM-head log-probs, judge pair scoring, SFT loss, reward loss.

Every op takes hidden states and the LM head (or the reward head) directly, so that the
[tokens × vocab] logits are never materialised; callers (the judge, SFT, the reward model,
PPO/DPO) call these functions explicitly — nothing in transformers is patched.

    linear_logprobs(hidden, weight, targets, bias=None, temperature=1.0) -> logp [N]
    linear_option_logprobs(hidden, weight, options, bias=None, temperature=1.0) -> (logp [N, K], lse [N])
    swapped_pair_scores(hidden [M, P, 2, H], weight, option_ids, bias=None, aggregate="prob") -> PairScores
    scores_from_gaps(gap_ab [M, P], gap_ba [M, P], aggregate) -> PairScores   (from option logit gaps)
    fused_linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, reduction="mean") -> loss
    reward_bt_loss(h_chosen, h_rejected, head_weight, head_bias, p, margin=None,
                   reduction="mean") -> (loss, r_chosen, r_rejected)

Each op has three implementations behind one signature: Triton kernels (taken on CUDA when
triton is installed), a chunked torch path with the same memory behaviour (taken elsewhere),
and an unfused `*_reference` used by the tests and benches. `use_path("triton" | "torch" |
"auto")` forces a path inside a `with` block, `set_default_path` sets it for the process.
"""

from ._dispatch import HAS_TRITON, PATHS, current_settings, set_default_path, use_path
from .cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .logprobs import (
    linear_logprobs,
    linear_logprobs_reference,
    linear_option_logprobs,
    linear_option_logprobs_reference,
)
from .reward_loss import reward_bt_loss, reward_bt_loss_reference
from .swapped_pair import PairScores, scores_from_gaps, swapped_pair_scores, swapped_pair_scores_reference

__all__ = [
    "HAS_TRITON",
    "PATHS",
    "PairScores",
    "current_settings",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "linear_logprobs",
    "linear_logprobs_reference",
    "linear_option_logprobs",
    "linear_option_logprobs_reference",
    "reward_bt_loss",
    "reward_bt_loss_reference",
    "scores_from_gaps",
    "set_default_path",
    "swapped_pair_scores",
    "swapped_pair_scores_reference",
    "use_path",
]
