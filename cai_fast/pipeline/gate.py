"""Whether PPO may run on a round's reward model: its held-out accuracy must be told apart from chance;
and which precision labels when label_dtype = "auto".

    reward_gate(summary, bar, fallback) -> {"passed", "accuracy", "interval", "n", "policy", "reason"}
    label_dtype_choice(by_dtype, run_dtype) -> {"dtype", "reason"}

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


def label_dtype_choice(by_dtype: dict, run_dtype: str) -> dict:
    """label_dtype = "auto": the dtype whose judge agrees with people most (the judge_check stage's
    `by_dtype`: {dtype: {"agreement": {"rate", "stderr"}, ...}}), where it beats `run_dtype`'s agreement
    by more than the standard error of the difference; else `run_dtype` (the cheaper one to keep).
    -> {"dtype", "reason"}."""
    def rate(d):
        a = by_dtype[d]["agreement"]
        return a["rate"], a["stderr"]

    base, base_se = rate(run_dtype) if run_dtype in by_dtype else (None, 0.0)
    best = max(by_dtype, key=lambda d: rate(d)[0])
    if base is None:
        return {"dtype": best, "reason": f"{best} agrees with people most ({rate(best)[0]:.3f})"}
    gain, se = rate(best)[0] - base, math.hypot(rate(best)[1], base_se)
    if best != run_dtype and gain > se:
        return {"dtype": best, "reason": f"{best} agrees with people {gain:+.3f} more than {run_dtype} (standard "
                                         f"error of the difference {se:.3f})"}
    return {"dtype": run_dtype, "reason": f"no dtype agrees with people more than {run_dtype} ({base:.3f}) by over "
                                          f"the standard error of the difference ({best}: {gain:+.3f}, se {se:.3f})"}
