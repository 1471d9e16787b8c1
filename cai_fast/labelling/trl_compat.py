"""trl's pairwise-judge interface, shipped here, and a bridge from a pairwise judge to trl's rewards.

trl ≤ 1.0 had `BasePairwiseJudge.judge(prompts, completions, shuffle_order=True) -> list[int]`: for each prompt,
the index (0 or 1) of the preferred completion of its pair, or -1 where the judge failed; judges that can, take
`return_scores=True` and return P(first ≻ second). trl 1.1 removed the judges, so cai_fast ships `BaseJudge` and
`BasePairwiseJudge`, and `ConstitutionalJudge` (cai_fast.labelling.judge) implements them. trl ≥ 1.1 takes judges
as reward functions (`reward_funcs=` of GRPOTrainer, RLOOTrainer, OnlineDPOTrainer): `JudgeReward(judge)` is one for
any judge with `score(prompts, responses_a, responses_b) -> result with .label`, a completion's reward being its mean
P(win) over its prompt's group, or P(completion ≻ reference) with `reference_column=`, or with `mode="score"` its
direct score (d-RLAIF: `judge.rate(prompts, responses) -> result with .score`, 1..9) (in full: `JudgeReward`).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Sequence

from .judge_config import SCORES

MODES = ("pairwise", "score")  # JudgeReward's


class BaseJudge(ABC):
    """Base class of trl ≤ 1.0's judges: subclasses implement `judge`."""

    @abstractmethod
    def judge(self, prompts: list[str], completions: list, shuffle_order: bool = True) -> list:
        """Judge the completions of each prompt."""


class BasePairwiseJudge(BaseJudge):
    """trl ≤ 1.0's pairwise judge: which completion of each pair is better."""

    @abstractmethod
    def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]:
        """For each prompt, the index (0 or 1) of the preferred completion of its pair; -1 where
        the judge failed (the caller decides what to do with those)."""


def response_text(response) -> str:
    """The text of a completion: a string, or trl's conversational list of messages."""
    if isinstance(response, str):
        return response
    return "\n\n".join(message["content"] for message in response)


def win_probabilities(judge, prompts: Sequence, firsts: Sequence, seconds: Sequence) -> list[float]:
    """P(first ≻ second) per pair from `judge.score`. Without asking the judge: an empty side
    loses to a non-empty one (0 or 1), and identical sides (two empty ones included) tie (0.5)."""
    texts = [(response_text(a).strip(), response_text(b).strip()) for a, b in zip(firsts, seconds)]
    probs = [0.5 if a == b else float(bool(a)) for a, b in texts]
    judged = [i for i, (a, b) in enumerate(texts) if a and b and a != b]
    if judged:
        labels = judge.score([prompts[i] for i in judged], [firsts[i] for i in judged],
                             [seconds[i] for i in judged]).label
        for i, p in zip(judged, labels):
            probs[i] = float(p)
    return probs


class JudgeReward:
    """A trl ≥ 1.1 reward function made from a pairwise judge (see the module docstring).

    trl calls `reward(prompts=..., completions=..., completion_ids=..., trainer_state=..., **dataset
    columns)` and wants one float (or None: "not applicable") per completion.

    - default, round robin: completions of the same prompt (GRPO/RLOO's group of generations,
      Online DPO's two samples) are judged against each other, every pair once (both orders inside
      the judge); a completion's reward is its mean P(win) over the others of its group. A completion
      alone in its group gets None. Under several processes (torchrun, accelerate) trl may split a
      group across them: every process then gathers all processes' completions, judges its share of
      the pairs, gathers the probabilities and returns the rewards of its own completions, so whole
      groups are judged (each process must call it, as trl's trainers do).
    - `reference_column="name"`: each completion is judged against the reference response in that
      dataset column; its reward is P(completion ≻ reference).
    - `mode="score"` (d-RLAIF): each completion on its own, its reward its direct score, the expected
      score from 1 to 9 of the judge's digit probabilities averaged over principles (`judge.rate`).
      No pairs, so no gathering across processes; an empty completion gets the lowest score, 1.
      Logs `<name>/spread` (mean best − worst score within a prompt's group, where it has several), and on a
      chat API without log-probs `<name>/scores_parsed` / `<name>/scores_missing` (the judge's counts, this call).

    An empty completion cannot be judged: it loses to a non-empty one (P(win) = 0). Identical
    completions (two empty ones included) tie (0.5) without asking the judge.

    A round robin's rewards average ½ in every group by construction, so trl's `rewards/<name>/mean`
    curve is flat. Through trl's `log_metric` the reward also logs `<name>/spread` (mean best − worst
    reward within a group: how much the judge separates a group's completions) and
    `<name>/decisiveness` (mean |2·P − 1| over the judged pairs); with a reference column,
    `<name>/win_rate` (mean P(completion ≻ reference)), which rises as the policy improves.
    """

    def __init__(self, judge, *, reference_column: str | None = None, mode: str = "pairwise",
                 name: str = "constitutional_judge"):
        if mode not in MODES:
            raise ValueError(f"JudgeReward: unknown mode {mode!r}; modes: {', '.join(MODES)}")
        if mode == "score" and reference_column is not None:
            raise ValueError("JudgeReward: mode='score' rates each completion on its own, so it takes no "
                             "reference_column; drop one of them")
        self.judge, self.reference_column, self.mode = judge, reference_column, mode
        self.__name__ = name  # trl logs each reward function under its __name__

    def __call__(self, prompts: list, completions: list, log_metric=None, **kwargs) -> list[float | None]:
        log = log_metric or (lambda name, value: None)
        if self.mode == "score":
            return self._direct_scores(prompts, completions, log)
        if self.reference_column is None:
            return self._round_robin(prompts, completions, log)
        if self.reference_column not in kwargs:
            raise ValueError(
                f"reward function {self.__name__!r}: no dataset column {self.reference_column!r} "
                f"(columns passed: {', '.join(sorted(kwargs)) or 'none'}); add it to the dataset "
                "or build JudgeReward without reference_column"
            )
        rewards = win_probabilities(self.judge, prompts, completions, kwargs[self.reference_column])
        log(f"{self.__name__}/win_rate", sum(rewards) / max(len(rewards), 1))
        return rewards

    def _direct_scores(self, prompts: list, completions: list, log) -> list[float]:
        judged = [i for i, c in enumerate(completions) if response_text(c).strip()]
        rewards = [float(SCORES[0])] * len(completions)
        if judged:
            before = _parse_counts(self.judge)
            scores = self.judge.rate([prompts[i] for i in judged], [completions[i] for i in judged]).score
            for i, score in zip(judged, scores):
                rewards[i] = float(score)
            after = _parse_counts(self.judge)
            if after != before:  # a chat API without log-probs
                log(f"{self.__name__}/scores_parsed", after[0] - before[0])
                log(f"{self.__name__}/scores_missing", after[1] - before[1])
        groups = defaultdict(list)
        for prompt, reward in zip(prompts, rewards):
            groups[json.dumps(prompt, sort_keys=True)].append(reward)
        spreads = [max(g) - min(g) for g in groups.values() if len(g) > 1]
        if spreads:
            log(f"{self.__name__}/spread", sum(spreads) / len(spreads))
        return rewards

    def _round_robin(self, prompts: list, completions: list, log) -> list[float | None]:
        rank, world = process_rank_and_count()
        everyone = all_gather((list(prompts), list(completions)), world)
        offset = sum(len(p) for p, _ in everyone[:rank])
        prompts, completions = [x for p, _ in everyone for x in p], [x for _, c in everyone for x in c]
        groups = defaultdict(list)
        for i, prompt in enumerate(prompts):
            groups[json.dumps(prompt, sort_keys=True)].append(i)
        pairs = [(i, j) for members in groups.values() for n, i in enumerate(members) for j in members[n + 1:]]
        mine = pairs[rank::world]
        probs = win_probabilities(self.judge, [prompts[i] for i, _ in mine], [completions[i] for i, _ in mine],
                                  [completions[j] for _, j in mine])
        shares = all_gather(probs, world)
        probs = [shares[n % world][n // world] for n in range(len(pairs))]  # back in pair order
        wins, games = [0.0] * len(prompts), [0] * len(prompts)
        for (i, j), p in zip(pairs, probs):
            wins[i], wins[j] = wins[i] + p, wins[j] + 1 - p
            games[i], games[j] = games[i] + 1, games[j] + 1
        rewards = [w / g if g else None for w, g in zip(wins, games)]
        self._log_round_robin(log, groups.values(), rewards, probs)
        return rewards[offset : offset + len(everyone[rank][0])]

    def _log_round_robin(self, log, groups, rewards: list, probs: list[float]) -> None:
        spreads = [max(rewards[i] for i in g) - min(rewards[i] for i in g) for g in groups if len(g) > 1]
        if spreads:
            log(f"{self.__name__}/spread", sum(spreads) / len(spreads))
            log(f"{self.__name__}/decisiveness", sum(abs(2 * p - 1) for p in probs) / len(probs))


def process_rank_and_count() -> tuple[int, int]:
    """(rank, number of processes) of torch.distributed, (0, 1) when it is not running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(value, world: int) -> list:
    """Every process's `value`, in rank order (just [value] with one process)."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def _parse_counts(judge) -> tuple[int, int]:
    """(scores parsed, scores missing) so far of a judge that counts them (ConstitutionalJudge.stats), else (0, 0)."""
    stats = getattr(judge, "stats", None)
    return getattr(stats, "scores_parsed", 0), getattr(stats, "scores_missing", 0)
