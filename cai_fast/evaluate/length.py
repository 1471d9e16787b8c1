"""Length control: how long responses are, and the win-rate a policy would have at equal length.

A judge (and people) prefer longer answers, so a policy can raise its win-rate by rambling (the RLAIF paper finds
length alone moves win-rates by about 10 points). Two figures keep that honest:

    length_stats(texts)       {n, mean_words, stderr}: response length in words (whitespace split)
    length_controlled_win_rate(labels, model_words, base_words)
        the least-squares fit label_i = a + b·d_i, d_i = model_words_i − base_words_i, read at d = 0:
        `win_rate` = a, clipped to [0, 1], with its standard error; `per_100_words` = 100·b
"""

from __future__ import annotations

import math
from typing import Sequence

from ..stats import mean_stderr


def words(text: str) -> int:
    return len(text.split())


def length_stats(texts: Sequence[str]) -> dict:
    """{n, mean_words, stderr} of the responses' lengths in words."""
    mean, stderr = mean_stderr([words(t) for t in texts])
    return {"n": len(texts), "mean_words": mean, "stderr": stderr}


def length_controlled_win_rate(labels: Sequence[float], model_words: Sequence[int],
                               base_words: Sequence[int]) -> dict:
    """The win-rate at equal length (see the module docstring): {n, win_rate, stderr,
    per_100_words, mean_gap_words, reason}.

    The ordinary least-squares fit label_i = a + b·d_i, d_i = model_words_i − base_words_i, read at
    d = 0: `win_rate` = a, the win-rate of a response as long as the base's, clipped to [0, 1], with
    the standard error of a, s·√(1/n + d̄²/Σ(d − d̄)²), s² = RSS/(n − 2); and `per_100_words` = 100·b,
    what 100 more words than the base buy. When every d is 0 the lengths cannot matter: a is the
    plain mean. When the d do not vary otherwise (or n < 3), the fit is undefined and `win_rate` is
    None, with the reason.
    """
    n = len(labels)
    gaps = [m - b for m, b in zip(model_words, base_words)]
    mean_gap, mean_label = (sum(gaps) / n, sum(labels) / n) if n else (float("nan"), float("nan"))
    out = {"n": n, "mean_gap_words": mean_gap, "win_rate": None, "stderr": None, "per_100_words": None,
           "reason": ""}
    if n and not any(gaps):
        return {**out, "win_rate": mean_label, "stderr": mean_stderr(labels)[1], "per_100_words": 0.0,
                "reason": "every response as long as the base's"}
    sxx = sum((d - mean_gap) ** 2 for d in gaps)
    if n < 3 or sxx == 0:
        return {**out, "reason": "fewer than 3 prompts, or the length gaps do not vary"}
    slope = sum((d - mean_gap) * (y - mean_label) for d, y in zip(gaps, labels)) / sxx
    intercept = mean_label - slope * mean_gap
    rss = sum((y - intercept - slope * d) ** 2 for d, y in zip(gaps, labels))
    stderr = math.sqrt(rss / (n - 2) * (1 / n + mean_gap**2 / sxx))
    return {**out, "win_rate": min(1.0, max(0.0, intercept)), "stderr": stderr, "per_100_words": 100 * slope}
