"""The constitutional judge: order-averaged soft preference labels of pairs of responses.

`ConstitutionalJudge(model, constitution, config).score(prompts, responses_a, responses_b) -> JudgeResult`. For a
pair (a, b), P principles are drawn from the constitution (by weight, seeded by the run seed and the pair's content,
so the same in both orders and on resume) or fixed with `principle_ids`, and each is asked in both orders, (A) = a
and (A) = b (layout: cai_fast.data.prompts). One forward pass per prompt reads the two option tokens' log-probs at
the answer position (`score_options`, through cai_fast.ops); with p(·) their softmax, a principle's label is
P(a ≻ b) = ½·[p_AB(A) + p_BA(B)] and a pair's the mean ("prob") or σ(mean log-odds) ("logodds"), so label(a, b) +
label(b, a) = 1 to fp32 rounding: position bias cancels by construction. Runs over a data set: cai_fast.labelling.

Through a chat API (cai_fast.engine.chat_api, which has no tokenizer here) the judge sends the same chats with a
system turn asking for the letter alone, and reads the letters' log-probs at the first answer token from the
API's top_logprobs (an option outside them gets the k-th log-prob, an upper bound, and is counted); the labels go
through the same computation, so label(a, b) + label(b, a) = 1 holds as it does here. Where the API gives no
log-probs (or with chain_of_thought) it asks for a reasoned answer ending in the verdict, parses the letter
(`parse_verdict`), and scores each order's verdict as a hard 1/0 clamped to [0.4, 0.6], the chain-of-thought
clamp: a principle's label is then 0.6, 0.5 or 0.4; an answer without a verdict scores 0.5 in that order (counted).

Direct scores (d-RLAIF, `rate(prompts, responses) -> RatingResult`): one response at a time, each under P principles
drawn by its content (or `principle_ids`), in a prompt that asks for a score from 1 to 9 by the principle's judge
question (`P.score_request`; no few-shot examples: the constitution's are pairs). The same scoring requests read the
nine digits' log-probs at the answer position ("Score: " then a digit, `SCORE_LAYOUTS`), exact on the in-process
engines and the servers, from top_logprobs on a chat API (as the letters above, a digit outside them counted);
renormalised over the digits, p(s), a principle's score is E[s] = Σ_{s=1..9} s·p(s) and a response's the mean over
its principles. The scale stops at 9 so that every score is one digit token: with "10" the model's "1" would mean
both 1 and the start of 10. The digits' share of the full-vocabulary probability is kept (`digit_mass`): a score
whose digits the model hardly puts mass on says little. On a chat API without log-probs the score is the number the
model wrote (`parse_score`), clamped to 1..9 as the paper clamps its scale, taken as certain (p = 1 on it,
digit_mass 1); an answer with no number scores 5, the middle (uniform p, digit_mass 0); both counted
(`scores_parsed`, `scores_missing` in JudgeStats).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..data import prompts as P
from ..config import DEFAULT_MODEL
from ..data.constitution import Constitution, Principle, load_constitution
from ..engine.base import SamplingParams
from .judge_config import SCORES, JudgeConfig
from .pairs import is_text, shown
from .trl_compat import BasePairwiseJudge, response_text, win_probabilities

if TYPE_CHECKING:
    import torch

COT_CLAMP = math.log(0.6 / 0.4)  # |logit| of 0.4 and 0.6: chain-of-thought probabilities stay in [0.4, 0.6]
COT_STOP = ("The answer is",)
VERDICT = re.compile(r"answer is:?\s*\(?\s*([A-Z])\b", re.IGNORECASE)  # a reasoned chat answer's verdict
SCORE_TOKENS = 16  # a chat API without log-probs: the longest answer asked for a direct score
SCALE_TALK = re.compile(r"\b1\s*(?:-|–|to)\s*(?:9|10)\b|(?:out of|/)\s*\d+", re.IGNORECASE)  # "1 to 9", "/9"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class JudgeError(ValueError):
    """The judge cannot be used as configured (e.g. a tokenizer without usable option tokens)."""


class JudgeInputError(ValueError):
    """Pairs that cannot be judged (an empty response, mismatched lengths); the message says which."""


# ---------------------------------------------------------------- option tokens


@dataclass(frozen=True)
class OptionLayout:
    """Where the verdict is read: the answer starts with `prefix`, then an option, then `closing`."""

    prefix: str
    options: tuple[str, ...]  # the judge's two letters, or the direct score's nine digits
    closing: str
    token_ids: tuple[tuple[int, ...], ...] = ()
    mode: str = "single-token"  # or "sequence": each option's summed token log-probs are compared

    def answer(self, index: int) -> str:
        """The full answer naming option `index` (0 = A), as few-shot examples give it."""
        return self.prefix + self.options[index] + self.closing

    def describe(self) -> str:
        if self.mode == "chat":
            return (f"chat API: the first answer token's top_logprobs of {' / '.join(map(repr, self.options))}; "
                    "an option outside them gets the k-th log-prob (an upper bound)")
        ids = " / ".join(str(list(t)) for t in self.token_ids)
        return (f"answer prefix {self.prefix!r}, options {' / '.join(map(repr, self.options))} "
                f"-> token ids {ids} ({self.mode})")


CHAT_OPTIONS = OptionLayout("", ("A", "B"), "", mode="chat")  # a chat API's answer: the letter alone
CANDIDATE_LAYOUTS = (
    OptionLayout("The answer is: (", ("A", "B"), ")"),
    OptionLayout("The answer is:", (" (A", " (B"), ")"),
    OptionLayout("The answer is:", (" A", " B"), ""),
)
DIGITS = tuple(str(s) for s in SCORES)
CHAT_SCORES = OptionLayout("", DIGITS, "", mode="chat")  # a chat API's direct score: the digit alone
SCORE_LAYOUTS = (
    OptionLayout("Score: ", DIGITS, ""),
    OptionLayout("Score:", tuple(" " + d for d in DIGITS), ""),
)
_PROBE = [P.user("Which response is better? Answer (A) or (B).")]


def detect_options(tokenizer, candidates: Sequence[OptionLayout] = CANDIDATE_LAYOUTS) -> OptionLayout:
    """The option layout for this tokenizer among `candidates` (the judge's letters by default, the
    direct score's digits with SCORE_LAYOUTS); JudgeError if none works.

    The first layout whose options are all single tokens in context is used — "The answer is: (" +
    "A"/"B", then "The answer is:" + " (A"/" (B", then "The answer is:" + " A"/" B". If none is, the
    first layout whose options tokenize cleanly (as a continuation, with no unknown token, all
    different) is scored by each option's sequence log-prob (`options.mode == "sequence"`); if none
    does, JudgeError. The choice goes into the run config and the report.
    """
    usable = [(layout, ids) for layout in candidates
              if (ids := _option_continuations(tokenizer, layout)) is not None]
    for layout, ids in usable:
        if all(len(i) == 1 for i in ids):
            return replace(layout, token_ids=ids, mode="single-token")
    if usable:
        layout, ids = usable[0]
        return replace(layout, token_ids=ids, mode="sequence")
    tried = "; ".join(f"{c.prefix!r} + {'/'.join(map(repr, c.options))}" for c in candidates)
    raise JudgeError(f"the tokenizer cannot express the judge's options {'/'.join(candidates[0].options)}: tried "
                     f"{tried}, and each option was merged with the text before it or became the unknown token; "
                     "use a model whose tokenizer has these letters and digits")


def _option_continuations(tokenizer, layout: OptionLayout) -> tuple[tuple[int, ...], ...] | None:
    """The token ids each option adds after the answer prefix, or None if they are not clean."""
    text = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True) + layout.prefix
    base = tokenizer(text, add_special_tokens=False)["input_ids"]
    found = []
    for choice in layout.options:
        full = tokenizer(text + choice, add_special_tokens=False)["input_ids"]
        added = tuple(full[len(base):])
        if full[: len(base)] != base or not added or tokenizer.unk_token_id in added:
            return None
        found.append(added)
    return tuple(found) if len(set(found)) == len(found) else None


def reserved_strings(tokenizer) -> list[str]:
    """Strings quoted text must not contain: the tokenizer's special and added tokens."""
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    return sorted(t for t in added | set(tokenizer.all_special_tokens) if len(t) > 1)

# ---------------------------------------------------------------- the judge


@dataclass
class JudgeResult:
    """Labels of M pairs under P principles each; tensors are fp32 on the CPU."""

    label: torch.Tensor  # [M] P(a ≻ b), aggregated over principles
    principle_label: torch.Tensor  # [M, P] ½·(p_ab_a + p_ba_b) per principle
    p_ab_a: torch.Tensor  # [M, P] P(a preferred) with a shown as (A)
    p_ba_b: torch.Tensor  # [M, P] P(a preferred) with a shown as (B)
    option_mass: torch.Tensor | None  # [M, P, 2] full-vocabulary probability of the two options, per order
    # (None when the labels were read from the two option rows alone, see ConstitutionalJudge.score)
    principle_ids: list[list[str]]
    rationales: list[list[list[str]]] | None = None  # [M][P][order] with chain of thought

    def record(self, i: int) -> dict:
        """The label fields of pair i, as JSON-ready lists."""
        out = {"label": self.label[i].item(), "principle_ids": self.principle_ids[i],
               "principle_label": self.principle_label[i].tolist(), "p_ab_a": self.p_ab_a[i].tolist(),
               "p_ba_b": self.p_ba_b[i].tolist()}
        if self.option_mass is not None:
            out["option_mass"] = self.option_mass[i].tolist()
        if self.rationales is not None:
            out["rationales"] = self.rationales[i]
        return out


@dataclass
class RatingResult:
    """Direct scores (1..9) of M responses under P principles each; tensors are fp32 on the CPU."""

    score: torch.Tensor  # [M] mean over principles of the expected score
    principle_score: torch.Tensor  # [M, P] E[s] = Σ s·p(s), p renormalised over the nine digits
    probs: torch.Tensor  # [M, P, 9] p(1) .. p(9)
    digit_mass: torch.Tensor  # [M, P] the digits' probability before renormalising (chat API: from top_logprobs;
    # without log-probs 1 where a score was parsed, 0 where none was)
    principle_ids: list[list[str]]
    answers: list[list[str]] | None = None  # [M][P] a chat API's answers where scores were parsed from them

    def record(self, i: int) -> dict:
        """The score fields of response i, as JSON-ready lists."""
        out = {"score": self.score[i].item(), "principle_ids": self.principle_ids[i],
               "principle_score": self.principle_score[i].tolist(), "probs": self.probs[i].tolist(),
               "digit_mass": self.digit_mass[i].tolist()}
        if self.answers is not None:
            out["answers"] = self.answers[i]
        return out


def expected_scores(logp: torch.Tensor, principles: list[list[Principle]]) -> RatingResult:
    """RatingResult from the digits' log-probs [M·P, 9] (response-major, then principle)."""
    import torch

    m, k = len(principles), len(principles[0])
    logp = logp.float().reshape(m, k, len(SCORES))
    probs = logp.softmax(-1)
    principle_score = probs @ torch.tensor(SCORES, dtype=torch.float32)
    return RatingResult(principle_score.mean(-1), principle_score, probs, logp.logsumexp(-1).exp(),
                        [[p.id for p in ps] for ps in principles])


@dataclass
class JudgeStats:
    """Running totals of a judge, for summaries and benches."""

    pairs: int = 0
    responses_rated: int = 0  # direct scores (rate)
    judge_prompts: int = 0
    prompt_tokens: int = 0
    rationale_tokens: int = 0
    seconds: float = 0.0
    options_outside_top_k: int = 0  # chat API: (judge prompt, option) pairs scored with the k-th log-prob
    prompts_outside_top_k: int = 0  # chat API: judge prompts with neither option in the top_logprobs (0.5)
    verdicts_parsed: int = 0  # chat API without log-probs: verdicts read from a reasoned answer
    verdicts_missing: int = 0  # ... answers with no verdict to read (0.5 in that order)
    scores_parsed: int = 0  # chat API without log-probs: direct scores read from the number written (clamped)
    scores_missing: int = 0  # ... answers with no number to read (scored 5)


class ConstitutionalJudge(BasePairwiseJudge):
    """Order-averaged soft preference labels from a chat model and a constitution.

    model: a LoadedModel, a model name or folder (cai_fast.engine.load_model), a transformers
    causal LM with `tokenizer=`, or a generator with `score_options` (cai_fast.engine).
    constitution: a Constitution, or a shipped name or TOML path.

    Chain of thought (config.chain_of_thought=1): each judge prompt first gets a greedy rationale of
    at most `cot_tokens` tokens after "Let's think step by step.", then the options are scored after
    it, and each order's probability is clamped to [0.4, 0.6], as the CAI paper does with CoT labels.

    Injection defence (config.defend=1, the default): the conversation and both responses are quoted
    between marker lines tagged with a keyed hash of the conversation alone (key: `tag_key`, a secret
    kept in the run config, by default derived from the seed), with look-alike characters folded
    (NFKC), the tokenizer's special-token strings and runs of "=" broken up, so a response cannot
    close its section or the user turn, or forge a marker (see cai_fast.data.prompts). As the tag
    does not depend on the pair, all pairs of one prompt share the few-shot block and the
    conversation in the engine's prefix cache. defend=0 exists to measure what the defence buys.
    """

    def __init__(self, model=DEFAULT_MODEL, constitution: Constitution | str = "default",
                 config: JudgeConfig | None = None, *, tokenizer=None):
        self.config = config or JudgeConfig()
        self.generator = _as_generator(model, tokenizer, self.config.batch_size)
        self.tokenizer = self.generator.tokenizer  # None for a chat API, whose server renders the chats
        self.constitution = (constitution if isinstance(constitution, Constitution)
                             else load_constitution(constitution))
        self.fixed_principles = resolve_principles(self.constitution, self.config)
        self.options = CHAT_OPTIONS if self.tokenizer is None else detect_options(self.tokenizer)
        self.reserved = None if not self.config.defend else reserved_strings(self.tokenizer) if self.tokenizer else []
        answers = (self.options.answer(0), self.options.answer(1))
        self.tag_key = self.config.tag_key or hashlib.sha256(f"judge-tag:{self.config.seed}".encode()).hexdigest()
        self.few_shot = P.judge_few_shot_messages(self.constitution, self.config.few_shot, answers,
                                                  reserved=self.reserved, key=self.tag_key)
        self.stats = JudgeStats()

    @property
    def principles_per_pair(self) -> int:
        return len(self.fixed_principles) or self.config.principles

    def score(self, prompts: Sequence, responses_a: Sequence, responses_b: Sequence) -> JudgeResult:
        """P(a ≻ b) for each pair (prompt, a, b), with its per-principle and per-order probabilities.

        prompts: text or chat messages; responses: text or trl's conversational message lists.
        An empty response or lists of different lengths raise JudgeInputError.
        """
        conversations, firsts, seconds = _checked_inputs("score", prompts, responses_a=responses_a,
                                                         responses_b=responses_b)
        if not conversations:
            return _empty_result()
        start = time.perf_counter()
        principles = [self.principles_for(*pair) for pair in zip(conversations, firsts, seconds)]
        chats = [self.judge_chat(conversation, first, second, principle)
                 for conversation, a, b, drawn in zip(conversations, firsts, seconds, principles)
                 for first, second in ((a, b), (b, a)) for principle in drawn]
        if self.tokenizer is None:
            before = self.generator.stats.prompt_tokens
            result = self._result_from_chat_api(chats, principles)
            tokens = self.generator.stats.prompt_tokens - before
        else:
            rationales = self._rationales(chats) if self.config.chain_of_thought else None
            rows = [P.render_continuation(self.tokenizer, chat, self._answer_prefix(rationales, i))
                    for i, chat in enumerate(chats)]
            if self._reads_states(rationales):
                result = self._result_from_states(self.generator.answer_states(rows), principles)
            else:
                result = self._result(self.generator.score_options(rows, self.options.token_ids), principles,
                                      rationales)
            tokens = sum(len(r) for r in rows)
        self._count(len(firsts), len(chats), tokens, time.perf_counter() - start)
        return result

    def judge(self, prompts: list, completions: list[list], shuffle_order: bool = True,
              return_scores: bool = False) -> list[int] | list[float]:
        """trl ≤ 1.0's pairwise interface: per prompt, the index of the preferred completion of its pair.

        return_scores=True gives P(first ≻ second) instead. shuffle_order is accepted for
        compatibility and has no effect: both orders are always scored and averaged. Identical
        completions tie (score 0.5, index 0), as does a label of exactly 0.5. An empty completion
        loses to a non-empty one; a pair of two empty completions cannot be judged: -1 (score 0.5).
        """
        if len(prompts) != len(completions) or any(len(pair) != 2 for pair in completions):
            raise JudgeInputError(f"judge(): needs one pair (two completions) per prompt, got {len(prompts)} "
                                  f"prompts and completions of sizes {[len(c) for c in completions]}")
        scores = win_probabilities(self, prompts, [c[0] for c in completions], [c[1] for c in completions])
        if return_scores:
            return scores
        return [-1 if not any(response_text(c).strip() for c in pair) else int(p < 0.5)
                for pair, p in zip(completions, scores)]

    def rate(self, prompts: Sequence, responses: Sequence) -> RatingResult:
        """The direct score (1..9, d-RLAIF; module docstring) of each response to its prompt, with its
        per-principle scores and digit probabilities.

        prompts: text or chat messages; responses: text or trl's conversational message lists. An
        empty response or lists of different lengths raise JudgeInputError; chain_of_thought raises
        JudgeError (a score is read from the digits' probabilities). A chat API without log-probs: the
        scores the model wrote, parsed (module docstring).
        """
        if self.config.chain_of_thought:
            raise JudgeError("direct scores are read from the digits' probabilities without a rationale; "
                             "set chain_of_thought = 0 to rate responses")
        conversations, texts = _checked_inputs("rate", prompts, responses=responses)
        if not texts:
            return _empty_rating()
        start = time.perf_counter()
        principles = [self.principles_for(c, r) for c, r in zip(conversations, texts)]
        chats = [[P.user(P.score_request(c, r, p.judge, reserved=self.reserved, key=self.tag_key))]
                 for c, r, drawn in zip(conversations, texts, principles) for p in drawn]
        if self.tokenizer is None:
            before = self.generator.stats.prompt_tokens
            if self.generator.logprobs:
                rating = expected_scores(self._chat_api_logprobs(chats, P.SCORE_DIGIT, CHAT_SCORES), principles)
            else:
                rating = self._parsed_scores(chats, principles)
            tokens = self.generator.stats.prompt_tokens - before
        else:
            rows = [P.render_continuation(self.tokenizer, chat, self.score_layout.prefix) for chat in chats]
            rating = expected_scores(self.generator.score_options(rows, self.score_layout.token_ids), principles)
            tokens = sum(len(r) for r in rows)
        self.stats.responses_rated += len(texts)
        self._count(0, len(chats), tokens, time.perf_counter() - start)
        return rating

    @cached_property
    def score_layout(self) -> OptionLayout:
        """Where direct scores are read: "Score: " and a digit token (detect_options over SCORE_LAYOUTS);
        CHAT_SCORES on a chat API."""
        return CHAT_SCORES if self.tokenizer is None else detect_options(self.tokenizer, SCORE_LAYOUTS)

    def principles_for(self, conversation: str, *responses: str) -> list[Principle]:
        """The principles asked about a pair (either order) or about one response (a direct score):
        fixed ones, or drawn by the content."""
        if self.fixed_principles:
            return self.fixed_principles
        key = P.pair_key(conversation, *responses)  # for a pair, the same in both orders
        return self.constitution.sample(key, self.config.principles, seed=self.config.seed, replace=False)

    def judge_chat(self, conversation: str, first: str, second: str, principle: Principle) -> list[dict]:
        """The judge's chat for one order and principle: few-shot block, then the judge request."""
        request = P.judge_request(conversation, first, second, principle.judge, reserved=self.reserved,
                                  key=self.tag_key)
        return self.few_shot + [P.user(request)]

    def _rationales(self, chats: list[list[dict]]) -> list[str]:
        ids = [P.render_continuation(self.tokenizer, chat, P.COT_PREFIX) for chat in chats]
        params = SamplingParams(self.config.cot_tokens, temperature=0.0, stop=COT_STOP)
        out = self.generator.generate(ids, params)
        self.stats.rationale_tokens += sum(len(c.token_ids) for c in out)
        return [c.text for c in out]

    def _answer_prefix(self, rationales: list[str] | None, row: int) -> str:
        if rationales is None:
            return self.options.prefix
        return f"{P.COT_PREFIX} {rationales[row]}\n{self.options.prefix}"

    def _count(self, pairs: int, prompts: int, tokens: int, seconds: float) -> None:
        self.stats.pairs += pairs
        self.stats.judge_prompts += prompts
        self.stats.prompt_tokens += tokens
        self.stats.seconds += seconds

    def _result_from_chat_api(self, chats: list[list[dict]], principles: list[list[Principle]]) -> JudgeResult:
        """Labels through a chat API (module docstring): the letters' first-token log-probs, or, where
        the API gives none or with chain_of_thought, the parsed verdicts as hard labels under the clamp."""
        import torch

        if self.generator.logprobs and not self.config.chain_of_thought:
            return self._result(self._chat_api_logprobs(chats, P.JUDGE_LETTER, self.options), principles, None)
        rationales = self._chat_api_answers(chats, P.JUDGE_VERDICT, self.config.cot_tokens)
        verdicts = [parse_verdict(text, self.options.options) for text in rationales]
        self.stats.verdicts_parsed += sum(v is not None for v in verdicts)
        self.stats.verdicts_missing += sum(v is None for v in verdicts)
        half = math.log(0.5)
        logp = torch.tensor([[half, half] if v is None else [0.0 if v == k else -math.inf for k in (0, 1)]
                             for v in verdicts], dtype=torch.float32)
        return self._result(logp, principles, rationales)

    def _parsed_scores(self, chats: list[list[dict]], principles: list[list[Principle]]) -> RatingResult:
        """Direct scores through a chat API without log-probs (module docstring): each answer's number,
        clamped to 1..9, as a certain score; 5 (uniform digits) where there is none; both counted."""
        import torch

        answers = self._chat_api_answers(chats, P.SCORE_DIGIT, SCORE_TOKENS)
        scores = [parse_score(text) for text in answers]
        self.stats.scores_parsed += sum(s is not None for s in scores)
        self.stats.scores_missing += sum(s is None for s in scores)
        logp = torch.tensor([[0.0] * len(SCORES) if s is None else [0.0 if d == s else -math.inf for d in SCORES]
                             for s in scores], dtype=torch.float32)
        rating = expected_scores(logp, principles)
        k = len(principles[0])
        rating.digit_mass = torch.tensor([s is not None for s in scores], dtype=torch.float32).reshape(-1, k)
        rating.answers = [answers[i * k:(i + 1) * k] for i in range(len(principles))]
        return rating

    def _chat_api_answers(self, chats: list[list[dict]], system: str, tokens: int) -> list[str]:
        """The chat API's greedy answers (at most `tokens` each) to the chats asked with `system` first; the
        tokens they took counted as rationale tokens."""
        generated = self.generator.stats.generated_tokens
        out = self.generator.generate_chats([[P.system(system)] + chat for chat in chats],
                                            SamplingParams(tokens, temperature=0.0))
        self.stats.rationale_tokens += self.generator.stats.generated_tokens - generated
        return [c.text for c in out]

    def _chat_api_logprobs(self, chats: list[list[dict]], system: str, options: OptionLayout) -> torch.Tensor:
        """The options' first-answer-token log-probs [N, K] from the chat API's top_logprobs, the chats
        asked with `system` first; options outside them (k-th log-prob) and prompts with none listed counted."""
        logp, outside = self.generator.option_logprobs([[P.system(system)] + chat for chat in chats], options.options)
        self.stats.options_outside_top_k += int(outside.sum())
        self.stats.prompts_outside_top_k += int(outside.all(-1).sum())
        return logp

    def _reads_states(self, rationales) -> bool:
        """Whether labels come straight from the answer-position hidden states through
        cai_fast.ops.swapped_pair_scores (only the two option rows of the LM head are read): a
        generator that gives states (the cached engine), single-token options, no chain of
        thought (its clamp), no option-mass diagnostic, logits that are the LM head's output as is (not
        capped). Else through `score_options`."""
        return (hasattr(self.generator, "answer_states") and getattr(self.generator, "linear_head", True)
                and self.options.mode == "single-token"
                and rationales is None and not self.config.option_mass)

    def _result_from_states(self, hidden: torch.Tensor, principles: list[list[Principle]]) -> JudgeResult:
        from ..ops import swapped_pair_scores

        m, k = len(principles), len(principles[0])
        hidden = hidden.reshape(m, 2, k, -1).transpose(1, 2)  # pair, principle, order (AB, BA), H
        weight, bias = self.generator.lm_head()
        ids = (self.options.token_ids[0][0], self.options.token_ids[1][0])
        s = swapped_pair_scores(hidden, weight, ids, bias, self.config.aggregate)
        return JudgeResult(*(t.float().cpu() for t in (s.label_mean, s.label, s.p_ab_a, s.p_ba_b)), None,
                           [[p.id for p in ps] for ps in principles])

    def _result(self, logp: torch.Tensor, principles: list[list[Principle]], rationales) -> JudgeResult:
        from ..ops import scores_from_gaps

        m, k = len(principles), len(principles[0])
        lp = logp.float().reshape(m, 2, k, 2)  # pair, order (AB, BA), principle, option (A, B)
        gap_ab = lp[:, 0, :, 0] - lp[:, 0, :, 1]  # the first response is (A)
        gap_ba = lp[:, 1, :, 1] - lp[:, 1, :, 0]  # the first response is (B)
        if rationales is not None:
            gap_ab, gap_ba = gap_ab.clamp(-COT_CLAMP, COT_CLAMP), gap_ba.clamp(-COT_CLAMP, COT_CLAMP)
        scores = scores_from_gaps(gap_ab, gap_ba, self.config.aggregate)
        by_row = None if rationales is None else [
            [[rationales[(i * 2 + o) * k + p] for o in (0, 1)] for p in range(k)] for i in range(m)]
        return JudgeResult(scores.label_mean, scores.label, scores.p_ab_a, scores.p_ba_b,
                           lp.exp().sum(-1).transpose(1, 2), [[p.id for p in ps] for ps in principles], by_row)


def parse_verdict(text: str, letters: Sequence[str]) -> int | None:
    """The option a reasoned answer chose: its last "answer is (X)" naming one of `letters`, else its
    last line when that is one letter (bracketed or not), else None."""
    named = [m.group(1) for m in VERDICT.finditer(text) if m.group(1) in letters]
    last = (text.strip().splitlines() or [""])[-1].strip(" ()[]*.:")
    choice = named[-1] if named else last if last in letters else None
    return None if choice is None else list(letters).index(choice)


def parse_score(text: str) -> int | None:
    """The direct score a chat answer wrote: its first number once talk of the scale ("1 to 9", "out of 10",
    "/9") is left out, rounded and clamped to 1..9; None when it has none."""
    found = NUMBER.search(SCALE_TALK.sub(" ", text))
    return None if found is None else min(max(round(float(found.group())), SCORES[0]), SCORES[-1])


def resolve_principles(constitution: Constitution, config: JudgeConfig) -> list[Principle]:
    """The principles fixed by `config.principle_ids`, or [] when they are drawn per pair; an
    unknown id (ConstitutionError) or more draws than principles (JudgeError) fail here."""
    fixed = [constitution.principle(i) for i in config.fixed_ids]
    available = len(constitution.principles)
    if not fixed and config.principles > available:
        raise JudgeError(f"principles={config.principles}, but constitution {constitution.name!r} has "
                         f"only {available}; ask for at most {available}")
    return fixed


def _as_generator(model, tokenizer, batch_size: int):
    if hasattr(model, "score_options") or hasattr(model, "option_logprobs"):
        return model
    from ..engine import LoadedModel, load_model, make_generator

    if isinstance(model, (str, Path)):
        model = load_model(str(model))
    if isinstance(model, LoadedModel):
        return make_generator(model, batch_size=batch_size)
    if tokenizer is None or not hasattr(model, "get_decoder"):
        raise TypeError(f"ConstitutionalJudge: cannot judge with a {type(model).__name__}; pass a model "
                        "name or folder, a LoadedModel, a transformers causal LM with tokenizer=, or a "
                        "generator with score_options")
    from ..engine.plain import PlainGenerator

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return PlainGenerator(model.eval(), tokenizer, batch_size)


def _checked_inputs(caller: str, prompts: Sequence, **responses: Sequence) -> tuple[list[str], ...]:
    """(conversation texts, then the texts of each list of responses); JudgeInputError naming the bad entry."""
    lists = {"prompts": prompts, **responses}
    if len({len(values) for values in lists.values()}) > 1:
        counts = [f"{len(values)} {name}" for name, values in lists.items()]
        raise JudgeInputError(f"{caller}(): got {', '.join(counts[:-1])} and {counts[-1]}; pass one of each per "
                              f"{'pair' if len(responses) > 1 else 'response'}")
    texts = [[_text_of(value, f"{name}[{i}]") for i, value in enumerate(values)] for name, values in lists.items()]
    return [P.conversation_text(p) for p in prompts], *texts[1:]

def _text_of(value, where: str) -> str:
    if not is_text(value):
        raise JudgeInputError(f"{where}: expected text or a list of {{role, content}} messages, got "
                              f"{shown(value)}")
    text = response_text(value).strip()
    if not text:
        raise JudgeInputError(f"{where} is empty; the judge reads non-empty responses to a non-empty prompt: "
                              "drop the pair (or response) or give it text")
    return text


def _empty_result() -> JudgeResult:
    import torch

    empty = torch.empty(0, 0)
    return JudgeResult(torch.empty(0), empty, empty, empty, torch.empty(0, 0, 2), [])


def _empty_rating() -> RatingResult:
    import torch

    return RatingResult(torch.empty(0), torch.empty(0, 0), torch.empty(0, 0, len(SCORES)), torch.empty(0, 0), [])
