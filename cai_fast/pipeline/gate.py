"""Whether PPO may run on a round's reward model: its held-out accuracy must be told apart from chance.

    reward_gate(summary, bar, fallback) -> {"passed", "accuracy", "interval", "n", "policy", "reason"}

The reward stage's summary carries the accuracy on its held-out pairs (`eval_accuracy` over
`eval_decided_pairs`). PPO runs when the low end of that accuracy's 95% Wilson interval is above
`bar` (0.5: better than chance at the held-out size; 0: always); otherwise the round's policy is `fallback`
("sft": the SFT policy, "dpo": DPO on the labels, "ppo": PPO anyway) and `reason` says why.
Torch-free.
"""

from __future__ import annotations

import math

from ..stats import wilson

FALLBACKS = ("sft", "dpo", "ppo")


def reward_gate(summary: dict, bar: float, fallback: str) -> dict:
    accuracy, n = summary.get("eval_accuracy"), int(summary.get("eval_decided_pairs") or 0)
    if accuracy is None or not n or math.isnan(accuracy):
        low, high, accuracy = 0.0, 1.0, float("nan")
    else:
        low, high = wilson(round(accuracy * n), n)
    shown = f"held-out accuracy {accuracy:.3f} (95% interval {low:.3f}-{high:.3f}, n={n})"
    if low > bar or not bar:
        why = f"is above {bar:g}" if low > bar else "is not checked (reward_bar = 0)"
        return {"passed": True, "accuracy": accuracy, "interval": [low, high], "n": n, "policy": "ppo",
                "reason": f"the reward model's {shown} {why}"}
    action = {"sft": "PPO did not run and the round's policy is its SFT policy",
              "dpo": "DPO on the labels ran instead of PPO",
              "ppo": "PPO ran anyway (on_weak_reward = \"ppo\")"}[fallback]
    return {"passed": False, "accuracy": accuracy, "interval": [low, high], "n": n, "policy": fallback,
            "reason": f"the reward model cannot be told from chance: its {shown} does not clear {bar:g}, so "
                      f"{action}; more labelled pairs (label.samples, train_size), a larger "
                      "reward.eval_fraction or a stronger judge would help"}
