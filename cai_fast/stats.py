"""Sample statistics the reports print beside every figure: a mean or a share with its standard error.

    mean_stderr(values) -> (mean, standard error of the mean)      NaN, NaN for no values
    share(count, n)     -> {"rate", "n", "stderr"}                  binomial stderr √(p(1 − p)/n)
    wilson(count, n)    -> (low, high)                              95% Wilson score interval of count/n
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


def wilson(count: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of the share count/n (95% for z = 1.96); (0, 1) for n = 0. Unlike
    p ± z·stderr it stays inside [0, 1] and does not collapse to a point at 0/n or n/n."""
    if not n:
        return 0.0, 1.0
    p = count / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
