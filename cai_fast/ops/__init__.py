"""Fused ops of cai_fast: LM-head log-probs, judge pair scoring, SFT loss, reward loss.

Every op takes hidden states and the LM head (or the reward head) directly, so that the [tokens × vocab] logits
are never materialised; callers (the judge, SFT, the reward model, PPO/DPO) call them explicitly — nothing in
transformers is patched: `linear_logprobs`, `linear_option_logprobs` (signatures in .logprobs), `swapped_pair_scores`,
`scores_from_gaps` (.swapped_pair), `fused_linear_cross_entropy` (.cross_entropy), `reward_bt_loss` (.reward_loss).
Each has three implementations behind one signature: Triton kernels (on CUDA when triton is installed), a chunked
torch path with the same memory behaviour (elsewhere) and an unfused `*_reference` for the tests and benches.
`use_path("triton" | "torch" | "auto")` forces a path inside a `with` block, `set_default_path` for the process.
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
