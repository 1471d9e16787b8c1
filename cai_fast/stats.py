"""Sample statistics the reports print beside every figure: a mean or a share with its standard error.

    mean_stderr(values) -> (mean, standard error of the mean)      NaN, NaN for no values
    share(count, n)     -> {"rate", "n", "stderr"}                  binomial stderr √(p(1 − p)/n)
"""

from __future__ import annotations

import math
from typing import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error s/√n (s with n − 1; 0 for one value)."""
    n = len(values)
    if not n:
        return float("nan"), float("nan")
    mean = sum(values) / n
    spread = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return mean, spread / math.sqrt(n)


def share(count: int, n: int) -> dict:
    """`count` of `n` as a rate, with the binomial standard error √(p(1 − p)/n)."""
    if not n:
        return {"rate": float("nan"), "n": 0, "stderr": float("nan")}
    p = count / n
    return {"rate": p, "n": n, "stderr": math.sqrt(p * (1 - p) / n)}
