"""How a model's logits follow from its LM head's output, where its config says they do not equal
it: Cohere's `logit_scale` (times), Granite's `logits_scaling` (divided by), Gemma 2's
`final_logit_softcapping` (cap * tanh(x / cap), after the scale). cai_fast.ops' fused log-probs read
the head's output as is, so a model with a transform is scored through its full logits instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> "LogitTransform":
        scale = (getattr(config, "logit_scale", None) or 1.0) / (getattr(config, "logits_scaling", None) or 1.0)
        return cls(scale, getattr(config, "final_logit_softcapping", None))

    @property
    def linear(self) -> bool:
        """Whether the logits are the head's output as is."""
        return self.scale == 1 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def describe(self) -> str:
        """", logits scaled by ..., capped at ..." ("" when linear), for the kernel record."""
        scaled = f", logits scaled by {self.scale:g}" if self.scale != 1 else ""
        return scaled + (f", logits capped at {self.softcap:g}" if self.softcap is not None else "")


def head_logprobs(hidden: torch.Tensor, head, transform: LogitTransform) -> torch.Tensor:
    """Log-softmax [n, V] (fp32) of the transformed full logits of a few final hidden states [n, H]."""
    return torch.log_softmax(transform(head(hidden)).float(), -1)
