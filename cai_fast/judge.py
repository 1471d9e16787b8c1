"""RLAIF labels: a constitutional judge with order-averaged soft labels, and the labelling run.

The judge
---------
For a pair (a, b) of responses to one conversation, P principles are drawn from the constitution
(by weight, without replacement, seeded by the run seed and the pair's content, so the same in
both orders and on resume), or fixed with `principle_ids`. Each principle is asked in both
orders: order AB shows (A) = a, (B) = b; order BA swaps them. A judge prompt (layout in
cai_fast.prompts) is the few-shot block, the conversation, the two responses, the principle's
question, then the start of the assistant's answer, "The answer is: (" by default, after which
the next token is the verdict. The generator's `score_options` reads the log-probs of the two
option tokens there — one forward pass per prompt, the LM head applied through cai_fast.ops to
the answer position only, no token generated. p(·) is the softmax over the two options; the soft
label of one principle is

    P(a ≻ b) = ½·[p_AB(A) + p_BA(B)]

and a pair's label is the mean over its principles (aggregate="prob") or σ(mean log-odds)
("logodds"). Exchanging a and b exchanges the orders, so label(a, b) + label(b, a) = 1 to fp32
rounding: position bias cancels by construction. trl's old judges shuffled the order at random,
which only turns the bias into noise; `judge(shuffle_order=...)` is accepted and ignored.

Option tokens: the first layout whose two options are single tokens in context is used —
"The answer is: (" + "A"/"B", then "The answer is:" + " (A"/" (B", then "The answer is:" +
" A"/" B". If none is, the first layout whose options tokenize cleanly (as a continuation, with
no unknown token) is scored by each option's sequence log-prob (`options.mode == "sequence"`);
if none does, JudgeError. The choice goes into the run config and the report.

Chain of thought (chain_of_thought=1): each judge prompt first gets a greedy rationale of at most
`cot_tokens` tokens after "Let's think step by step.", then the options are scored after it, and
each order's probability is clamped to [0.4, 0.6], as the CAI paper does with CoT labels.

Injection defence (defend=1, the default): the conversation and both responses are quoted
between marker lines tagged with a hash of the pair, with the tokenizer's special-token strings
and runs of "=" broken up, so a response cannot close its section or the user turn, or forge a
marker (see cai_fast.prompts). defend=0 exists to measure what the defence buys.

The labelling run
-----------------
`run_labelling(judge, prompts_or_pairs, config, out_dir=...)`. Prompts: N responses each
(temperature, seeded), then all pairs among them or `pairs_per_prompt` of them (seeded); pairs
with an empty response or two identical ones are left out and counted. Pairs (`load_pairs`: trl
preference JSONL, plain or conversational, SL-CAI's preference output, hh-rlhf transcripts) are
judged as given. Samples (keyed by prompt id) and labels (keyed by pair id) are appended to the
run folder atomically (cai_fast.store), so a killed run resumes without regenerating or
relabelling anything, and a different config on the same folder is refused.

Run folder: `samples-*.jsonl`, `labels-*.jsonl` (full records), `preference/train-00000.jsonl` in
trl's preference format — prompt, chosen (the side the soft label prefers), rejected, p_chosen,
margin (= logit p_chosen, which trl's RewardTrainer reads), principle_ids, p_chosen_by_principle,
p_chosen_as_a / p_chosen_as_b (per principle, with chosen shown as (A) / as (B)), pair_id,
prompt_id, chosen_id, rejected_id — and `report.md` with `label_confidence.png`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tqdm.auto import tqdm

from . import prompts as P
from .constitution import Constitution, Principle, load_constitution
from .data import ON_ERROR, Prompt, PromptLoadError, prompt_id
from .engine.base import SamplingParams
from .engine.loading import DEFAULT_MODEL
from .sl_cai import stable_seed
from .store import RunStore, write_jsonl, write_atomic
from .trl_compat import BasePairwiseJudge, response_text, win_probabilities

if TYPE_CHECKING:
    import torch

SAMPLES, LABELS = "samples", "labels"
AGGREGATES = ("prob", "logodds")  # as cai_fast.ops.swapped_pair_scores takes them
COT_CLAMP = math.log(0.6 / 0.4)  # |logit| of 0.4 and 0.6: chain-of-thought probabilities stay in [0.4, 0.6]
COT_STOP = ("The answer is",)
_MARGIN_CAP = 1e-6  # p_chosen is capped at 1 - this for the margin, so it stays finite


class JudgeError(ValueError):
    """The judge cannot be used as configured (e.g. a tokenizer without usable option tokens)."""


class JudgeInputError(ValueError):
    """Pairs that cannot be judged (an empty response, mismatched lengths); the message says which."""


# ---------------------------------------------------------------- configuration


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class JudgeConfig:
    principles: int = _option(4, "principles drawn per pair (by weight, without replacement); each is "
                                 "asked in both orders")
    principle_ids: str = _option("", "comma-separated principle ids asked for every pair instead of drawing")
    aggregate: str = _option("prob", "how principle labels combine: prob (mean probability) or logodds")
    few_shot: int = _option(0, "judge examples made from the constitution's few-shot examples (each adds "
                               "about 250 tokens to every judge prompt)")
    chain_of_thought: int = _option(0, "1 = a rationale is generated before the verdict; probabilities "
                                       "are clamped to [0.4, 0.6]")
    cot_tokens: int = _option(64, "max new tokens of each rationale (with chain_of_thought)")
    defend: int = _option(1, "1 = quote the conversation and responses between tagged markers with special "
                             "tokens broken up; 0 only to measure the injection defence")
    batch_size: int = _option(16, "judge prompts per forward pass (and sampled responses per batch)")
    seed: int = _option(0, "seed for principle draws, response sampling and pair selection")

    def __post_init__(self):
        if not isinstance(self.principle_ids, str):
            self.principle_ids = ",".join(self.principle_ids)
        for name in ("principles", "batch_size", "cot_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.few_shot < 0:
            raise ValueError(f"few_shot must be >= 0, got {self.few_shot}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        for name in ("chain_of_thought", "defend"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1, got {getattr(self, name)!r}")

    @property
    def fixed_ids(self) -> list[str]:
        return [i.strip() for i in self.principle_ids.split(",") if i.strip()]


@dataclass
class LabelConfig:
    samples: int = _option(2, "responses sampled per prompt (with --prompts)")
    pairs_per_prompt: int = _option(0, "pairs judged per prompt, drawn from all pairs of its samples (0 = all)")
    sample_tokens: int = _option(128, "max new tokens of each sampled response")
    temperature: float = _option(0.8, "sampling temperature of the responses (> 0)")
    top_p: float = _option(0.95, "nucleus sampling threshold of the responses")

    def __post_init__(self):
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 (pairs need two responses), got {self.samples}")
        if self.pairs_per_prompt < 0 or self.sample_tokens < 1:
            raise ValueError(f"pairs_per_prompt must be >= 0 and sample_tokens >= 1, got "
                             f"{self.pairs_per_prompt} and {self.sample_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (greedy samples would all be the same), "
                             f"got {self.temperature}")


# ---------------------------------------------------------------- option tokens


@dataclass(frozen=True)
class OptionLayout:
    """Where the verdict is read: the answer starts with `prefix`, then an option, then `closing`."""

    prefix: str
    options: tuple[str, str]
    closing: str
    token_ids: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    mode: str = "single-token"  # or "sequence": each option's summed token log-probs are compared

    def answer(self, index: int) -> str:
        """The full answer naming option `index` (0 = A), as few-shot examples give it."""
        return self.prefix + self.options[index] + self.closing

    def describe(self) -> str:
        ids = " / ".join(str(list(t)) for t in self.token_ids)
        return (f"answer prefix {self.prefix!r}, options {self.options[0]!r} / {self.options[1]!r} "
                f"-> token ids {ids} ({self.mode})")


CANDIDATE_LAYOUTS = (
    OptionLayout("The answer is: (", ("A", "B"), ")"),
    OptionLayout("The answer is:", (" (A", " (B"), ")"),
    OptionLayout("The answer is:", (" A", " B"), ""),
)
_PROBE = [P.user("Which response is better? Answer (A) or (B).")]


def detect_options(tokenizer) -> OptionLayout:
    """The option layout for this tokenizer (see the module docstring); JudgeError if none works."""
    usable = [(layout, ids) for layout in CANDIDATE_LAYOUTS
              if (ids := _option_continuations(tokenizer, layout)) is not None]
    for layout, ids in usable:
        if all(len(i) == 1 for i in ids):
            return replace(layout, token_ids=ids, mode="single-token")
    if usable:
        layout, ids = usable[0]
        return replace(layout, token_ids=ids, mode="sequence")
    tried = "; ".join(f"{c.prefix!r} + {c.options[0]!r}/{c.options[1]!r}" for c in CANDIDATE_LAYOUTS)
    raise JudgeError(f"the tokenizer cannot express the judge's options (A)/(B): tried {tried}, and each "
                     "option was merged with the text before it or became the unknown token; use a "
                     "model whose tokenizer has the letters A and B")


def _option_continuations(tokenizer, layout: OptionLayout) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The token ids each option adds after the answer prefix, or None if they are not clean."""
    text = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True) + layout.prefix
    base = tokenizer(text, add_special_tokens=False)["input_ids"]
    found = []
    for option in layout.options:
        full = tokenizer(text + option, add_special_tokens=False)["input_ids"]
        added = tuple(full[len(base):])
        if full[: len(base)] != base or not added or tokenizer.unk_token_id in added:
            return None
        found.append(added)
    return tuple(found) if found[0] != found[1] else None


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
    option_mass: torch.Tensor  # [M, P, 2] full-vocabulary probability of the two options, per order
    principle_ids: list[list[str]]
    rationales: list[list[list[str]]] | None = None  # [M][P][order] with chain of thought

    def record(self, i: int) -> dict:
        """The label fields of pair i, as JSON-ready lists."""
        out = {"label": self.label[i].item(), "principle_ids": self.principle_ids[i],
               "principle_label": self.principle_label[i].tolist(), "p_ab_a": self.p_ab_a[i].tolist(),
               "p_ba_b": self.p_ba_b[i].tolist(), "option_mass": self.option_mass[i].tolist()}
        if self.rationales is not None:
            out["rationales"] = self.rationales[i]
        return out


@dataclass
class JudgeStats:
    """Running totals of a judge, for summaries and benches."""

    pairs: int = 0
    judge_prompts: int = 0
    prompt_tokens: int = 0
    rationale_tokens: int = 0
    seconds: float = 0.0


class ConstitutionalJudge(BasePairwiseJudge):
    """Order-averaged soft preference labels from a chat model and a constitution.

    model: a LoadedModel, a model name or folder (cai_fast.engine.load_model), a transformers
    causal LM with `tokenizer=`, or a generator with `score_options` (cai_fast.engine).
    constitution: a Constitution, or a shipped name or TOML path.
    """

    def __init__(self, model=DEFAULT_MODEL, constitution: Constitution | str = "default",
                 config: JudgeConfig | None = None, *, tokenizer=None):
        self.config = config or JudgeConfig()
        self.generator = _as_generator(model, tokenizer, self.config.batch_size)
        self.tokenizer = self.generator.tokenizer
        self.constitution = (constitution if isinstance(constitution, Constitution)
                             else load_constitution(constitution))
        self.fixed_principles = resolve_principles(self.constitution, self.config)
        self.options = detect_options(self.tokenizer)
        self.reserved = reserved_strings(self.tokenizer) if self.config.defend else None
        answers = (self.options.answer(0), self.options.answer(1))
        self.few_shot = P.judge_few_shot_messages(self.constitution, self.config.few_shot, answers,
                                                  reserved=self.reserved)
        self.stats = JudgeStats()

    @property
    def principles_per_pair(self) -> int:
        return len(self.fixed_principles) or self.config.principles

    def score(self, prompts: Sequence, responses_a: Sequence, responses_b: Sequence) -> JudgeResult:
        """P(a ≻ b) for each pair (prompt, a, b), with its per-principle and per-order probabilities.

        prompts: text or chat messages; responses: text or trl's conversational message lists.
        An empty response or lists of different lengths raise JudgeInputError.
        """
        conversations, firsts, seconds = _checked_inputs(prompts, responses_a, responses_b)
        if not conversations:
            return _empty_result()
        start = time.perf_counter()
        principles = [self.principles_for(*pair) for pair in zip(conversations, firsts, seconds)]
        chats = [self.judge_chat(conversation, first, second, principle)
                 for conversation, a, b, drawn in zip(conversations, firsts, seconds, principles)
                 for first, second in ((a, b), (b, a)) for principle in drawn]
        rationales = self._rationales(chats) if self.config.chain_of_thought else None
        rows = [P.render_continuation(self.tokenizer, chat, self._answer_prefix(rationales, i))
                for i, chat in enumerate(chats)]
        logp = self.generator.score_options(rows, self.options.token_ids)
        self._count(len(firsts), rows, time.perf_counter() - start)
        return self._result(logp, principles, rationales)

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

    def principles_for(self, conversation: str, first: str, second: str) -> list[Principle]:
        """The principles asked about a pair: fixed ones, or drawn by the pair's content (either order)."""
        if self.fixed_principles:
            return self.fixed_principles
        key = P.judge_tag(conversation, first, second)  # the same in both orders
        return self.constitution.sample(key, self.config.principles, seed=self.config.seed, replace=False)

    def judge_chat(self, conversation: str, first: str, second: str, principle: Principle) -> list[dict]:
        """The judge's chat for one order and principle: few-shot block, then the judge request."""
        request = P.judge_request(conversation, first, second, principle.judge, reserved=self.reserved)
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

    def _count(self, pairs: int, rows: list[list[int]], seconds: float) -> None:
        self.stats.pairs += pairs
        self.stats.judge_prompts += len(rows)
        self.stats.prompt_tokens += sum(len(r) for r in rows)
        self.stats.seconds += seconds

    def _result(self, logp: torch.Tensor, principles: list[list[Principle]], rationales) -> JudgeResult:
        from .ops.swapped_pair import scores_from_gaps

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
    if hasattr(model, "score_options"):
        return model
    from .engine import LoadedModel, load_model, make_generator

    if isinstance(model, (str, Path)):
        model = load_model(str(model))
    if isinstance(model, LoadedModel):
        return make_generator(model, batch_size=batch_size)
    if tokenizer is None or not hasattr(model, "get_decoder"):
        raise TypeError(f"ConstitutionalJudge: cannot judge with a {type(model).__name__}; pass a model "
                        "name or folder, a LoadedModel, a transformers causal LM with tokenizer=, or a "
                        "generator with score_options")
    from .engine.plain import PlainGenerator

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return PlainGenerator(model.eval(), tokenizer, batch_size)


def _checked_inputs(prompts, responses_a, responses_b) -> tuple[list[str], list[str], list[str]]:
    """(conversation texts, first texts, second texts); JudgeInputError naming the bad pair."""
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise JudgeInputError(f"score(): got {len(prompts)} prompts, {len(responses_a)} responses_a and "
                              f"{len(responses_b)} responses_b; pass one of each per pair")
    texts = ([], [], [])
    for i, (prompt, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
        for name, value, out in (("prompts", prompt, texts[0]), ("responses_a", a, texts[1]),
                                 ("responses_b", b, texts[2])):
            out.append(_text_of(value, f"{name}[{i}]"))
    conversations = [P.conversation_text(p) for p in prompts]
    return conversations, texts[1], texts[2]


def _is_text(value) -> bool:
    """A string, or a list of {role, content} messages."""
    return isinstance(value, str) or isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)


def _text_of(value, where: str) -> str:
    if not _is_text(value):
        raise JudgeInputError(f"{where}: expected text or a list of {{role, content}} messages, got "
                              f"{_shown(value)}")
    text = response_text(value).strip()
    if not text:
        raise JudgeInputError(f"{where} is empty; the judge compares two non-empty responses to a "
                              "non-empty prompt: drop the pair or give it text")
    return text


def _shown(value) -> str:
    return f"{type(value).__name__} {json.dumps(value, ensure_ascii=False, default=repr)[:60]}"


def _empty_result() -> JudgeResult:
    import torch

    empty = torch.empty(0, 0)
    return JudgeResult(torch.empty(0), empty, empty, empty, torch.empty(0, 0, 2), [])


# ---------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """Two responses to one prompt. prompt, a and b are text or trl's conversational message lists."""

    id: str
    prompt_id: str
    prompt: str | list
    a: str | list
    b: str | list
    a_id: str
    b_id: str
    source: str
    meta: dict = field(default_factory=dict, compare=False)


class PairLoadError(PromptLoadError):
    """A pairs file that cannot be used; the message names the file, the line and the field."""


PAIR_FIELDS = ("prompt", "chosen", "rejected")
_PAIR_HINT = ("a pairs file is JSONL with prompt, chosen and rejected (trl's preference format: strings "
              "or lists of {role, content} messages), or hh-rlhf chosen/rejected transcripts")
_TURN = re.compile(r"\n\n(Human|Assistant):")
_LAST_ANSWER = "\n\nAssistant:"


@dataclass
class PairSet:
    """The pairs of one file, in order, with what loading dropped."""

    path: str
    pairs: list[Pair]
    duplicates: int = 0
    malformed: int = 0

    def __iter__(self):
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        bad = f", {self.malformed} malformed records skipped" if self.malformed else ""
        return f"loaded {len(self.pairs)} pairs from {self.path} ({self.duplicates} duplicates dropped{bad})"


def load_pairs(path: str | Path, *, limit: int | None = None, on_error: str = "raise") -> PairSet:
    """Read a pairs file (see `_PAIR_HINT`); a = the file's chosen, b = its rejected.

    Duplicate pairs (same prompt, chosen and rejected) are dropped and counted. A malformed record
    raises PairLoadError naming the line and field; on_error="skip" drops and counts it instead.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    result, seen, plain = PairSet(str(path), []), set(), None
    for number, line in enumerate(_pair_lines(Path(path)), 1):
        if limit is not None and len(result.pairs) >= limit:
            break
        try:
            pair = _pair_from_line(line, f"{path}:{number}", plain) if line.strip() else None
        except PairLoadError:
            if on_error == "raise":
                raise
            result.malformed += 1
            continue
        if pair is None or pair.id in seen:
            result.duplicates += pair is not None
            continue
        plain = isinstance(pair.prompt, str) if plain is None else plain
        seen.add(pair.id)
        result.pairs.append(pair)
    if not result.pairs:
        raise PairLoadError(str(path), f"no pairs left ({result.summary()})", _PAIR_HINT)
    return result


def _pair_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise PairLoadError(str(path), "file not found", "check the path")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PairLoadError(str(path), f"not UTF-8 text ({err})", "save the file as UTF-8") from None


def _pair_from_line(line: str, where: str, plain: bool | None) -> Pair:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PairLoadError(where, f"not valid JSON ({err.msg})", "fix the line") from None
    if not isinstance(record, dict):
        raise PairLoadError(where, f"is a JSON {type(record).__name__}, not an object", _PAIR_HINT)
    if "prompt" not in record and all(_is_transcript(record.get(k)) for k in ("chosen", "rejected")):
        prompt, chosen, rejected = split_transcripts(record["chosen"], record["rejected"], where)
    else:
        prompt, chosen, rejected = (_pair_field(record, name, where) for name in PAIR_FIELDS)
    if plain is not None and isinstance(prompt, str) != plain:
        raise PairLoadError(where, "mixes plain-string and conversational records",
                            "write every record of the file in one of the two formats", field="prompt")
    content = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
    meta = {k: v for k, v in record.items() if k not in PAIR_FIELDS}
    return Pair(digest, prompt_id(P.conversation_text(prompt)), prompt, chosen, rejected,
                "input-chosen", "input-rejected", where, meta)


def _pair_field(record: dict, name: str, where: str):
    if name not in record:
        raise PairLoadError(where, "missing", _PAIR_HINT, field=name)
    value = record[name]
    if not _is_text(value):
        raise PairLoadError(where, f"is {_shown(value)}", "give a string or a list of {role, content} "
                            "messages", field=name)
    if not response_text(value).strip():
        raise PairLoadError(where, "is empty", "give it text or drop the record", field=name)
    return value


def _is_transcript(value) -> bool:
    return isinstance(value, str) and "\n\nHuman:" in value and _LAST_ANSWER in value


def split_transcripts(chosen: str, rejected: str, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """hh-rlhf transcripts as (prompt messages, [chosen answer], [rejected answer]): the prompt is
    the conversation both share up to their last common "Assistant:" (trl's implicit prompt)."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(_LAST_ANSWER)
    if cut < 0:
        raise PairLoadError(where, "chosen and rejected share no conversation up to an Assistant turn",
                            "check that both transcripts continue the same conversation", field="chosen")
    answers = [t[cut + len(_LAST_ANSWER):].strip() for t in (chosen, rejected)]
    for name, answer in zip(("chosen", "rejected"), answers):
        if not answer:
            raise PairLoadError(where, "the final Assistant answer is empty", "drop the record", field=name)
    return transcript_messages(chosen[:cut]), [P.assistant(answers[0])], [P.assistant(answers[1])]


def transcript_messages(transcript: str) -> list[dict]:
    """"\\n\\nHuman: … \\n\\nAssistant: …" turns as chat messages."""
    parts = _TURN.split(transcript)[1:]
    return [{"role": "user" if speaker == "Human" else "assistant", "content": text.strip()}
            for speaker, text in zip(parts[::2], parts[1::2])]


# ---------------------------------------------------------------- the labelling run


@dataclass
class LabelResult:
    records: list[dict]
    preference: object  # datasets.Dataset in trl's preference format
    summary: dict
    report: Path | None = None


def run_labelling(judge: ConstitutionalJudge, source: Sequence[Prompt] | Sequence[Pair],
                  config: LabelConfig = LabelConfig(), *, out_dir: str | Path | None = None,
                  run_info: dict | None = None, progress: bool = True) -> LabelResult:
    """Label prompts (sample, pair, judge) or pairs (judge); with `out_dir`, resumably."""
    start, items = time.perf_counter(), list(source)
    if not items:
        raise ValueError("run_labelling: nothing to label (no prompts or pairs given)")
    from_prompts = isinstance(items[0], Prompt)
    store = None if out_dir is None else RunStore(out_dir, _run_config(judge, config, items, from_prompts,
                                                                       run_info))
    summary = {}
    if from_prompts:
        samples, summary = _sample_all(judge, items, config, store, progress)
        pairs, left_out = pairs_from_samples(samples, config.pairs_per_prompt, judge.config.seed)
        summary.update(left_out)
    else:
        pairs = items
    records, judging = _label_all(judge, pairs, store, progress)
    summary.update(judging, seconds=round(time.perf_counter() - start, 1))
    return _finish(judge, records, summary, store)


def _run_config(judge: ConstitutionalJudge, config: LabelConfig, items: list, from_prompts: bool,
                run_info: dict | None) -> dict:
    ids = hashlib.sha256("".join(x.id for x in items).encode()).hexdigest()
    sampling = asdict(config) if from_prompts else {}
    return {**sampling, **asdict(judge.config), **(run_info or {}), "stage": "label",
            "input": "prompts" if from_prompts else "pairs", "inputs_sha256": ids, "num_inputs": len(items),
            "constitution": judge.constitution.name, "constitution_sha256": judge.constitution.fingerprint(),
            "options": judge.options.describe()}


def _sample_all(judge: ConstitutionalJudge, prompts: list[Prompt], config: LabelConfig,
                store: RunStore | None, progress: bool) -> tuple[list[dict], dict]:
    """N sampled responses per prompt; the ones stored by an earlier run are read, not redone."""
    done = {r["prompt_id"]: r for r in store.read(SAMPLES)} if store else {}
    todo = [p for p in prompts if p.id not in done]
    chunk = max(1, judge.config.batch_size // config.samples)
    tokens_before, start = judge.generator.stats.generated_tokens, time.perf_counter()
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="sampling", unit="prompt",
              disable=not progress) as bar:
        for i in range(0, len(todo), chunk):
            records = _sample_batch(judge, todo[i : i + chunk], config)
            if store:
                store.append(SAMPLES, records)
            done.update((r["prompt_id"], r) for r in records)
            bar.update(len(records))
    stats = {"prompts": len(prompts), "prompts_sampled_now": len(todo),
             "sample_tokens": judge.generator.stats.generated_tokens - tokens_before,
             "sampling_seconds": round(time.perf_counter() - start, 2)}
    return [done[p.id] for p in prompts], stats


def _sample_batch(judge: ConstitutionalJudge, batch: list[Prompt], config: LabelConfig) -> list[dict]:
    n = config.samples
    ids = [P.render(judge.tokenizer, [P.user(p.text)]) for p in batch for _ in range(n)]
    seed = stable_seed(judge.config.seed, batch[0].id, "samples")
    texts = [c.text for c in judge.generator.generate(
        ids, SamplingParams(config.sample_tokens, config.temperature, config.top_p, seed))]
    return [{"prompt_id": p.id, "prompt": p.text, "source": p.source,
             "sample_ids": [f"{p.id}-{k}" for k in range(n)], "samples": texts[j * n : (j + 1) * n]}
            for j, p in enumerate(batch)]


def pairs_from_samples(samples: list[dict], pairs_per_prompt: int, seed: int) -> tuple[list[Pair], dict]:
    """The pairs to judge among each prompt's samples, and how many were left out and why."""
    pairs, left_out = [], {"left_out_empty": 0, "left_out_identical": 0}
    for record in samples:
        texts, ids, pid = record["samples"], record["sample_ids"], record["prompt_id"]
        for i, j in _index_pairs(pid, len(texts), pairs_per_prompt, seed):
            a, b = texts[i].strip(), texts[j].strip()
            if not a or not b or a == b:
                left_out["left_out_empty" if not a or not b else "left_out_identical"] += 1
                continue
            pairs.append(Pair(f"{pid}-{i}-{j}", pid, [P.user(record["prompt"])], [P.assistant(a)],
                              [P.assistant(b)], ids[i], ids[j], record["source"]))
    return pairs, left_out


def _index_pairs(key: str, n: int, k: int, seed: int) -> list[tuple[int, int]]:
    """All index pairs i < j of n samples, or k of them drawn by (seed, key)."""
    combos = list(itertools.combinations(range(n), 2))
    if 0 < k < len(combos):
        combos = sorted(random.Random(f"{seed}:{key}:pairs").sample(combos, k))
    return combos


def _label_all(judge: ConstitutionalJudge, pairs: Sequence[Pair], store: RunStore | None,
               progress: bool) -> tuple[list[dict], dict]:
    """Label records of every pair; the ones stored by an earlier run are read, not redone."""
    done = {r["pair_id"]: r for r in store.read(LABELS)} if store else {}
    todo = [p for p in pairs if p.id not in done]
    chunk = max(1, math.ceil(judge.config.batch_size / (2 * judge.principles_per_pair)))
    before = replace(judge.stats)
    with tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="judging", unit="pair",
              disable=not progress) as bar:
        for i in range(0, len(todo), chunk):
            batch = todo[i : i + chunk]
            result = judge.score([p.prompt for p in batch], [p.a for p in batch], [p.b for p in batch])
            records = [_label_record(p, result.record(k)) for k, p in enumerate(batch)]
            if store:
                store.append(LABELS, records)
            done.update((r["pair_id"], r) for r in records)
            bar.update(len(batch))
    return [done[p.id] for p in pairs], _judging_stats(judge.stats, before, len(pairs) - len(todo))


def _label_record(pair: Pair, labels: dict) -> dict:
    return {"pair_id": pair.id, "prompt_id": pair.prompt_id, "a_id": pair.a_id, "b_id": pair.b_id,
            "source": pair.source, "prompt": pair.prompt, "a": pair.a, "b": pair.b, "meta": pair.meta,
            **labels}


def _judging_stats(now: JudgeStats, before: JudgeStats, resumed: int) -> dict:
    pairs, seconds = now.pairs - before.pairs, now.seconds - before.seconds
    prompts, tokens = now.judge_prompts - before.judge_prompts, now.prompt_tokens - before.prompt_tokens
    rate = (lambda n, digits: round(n / seconds, digits)) if seconds > 0 else (lambda n, digits: 0.0)
    return {"labels_from_earlier_run": resumed, "labelled_now": pairs, "judge_prompts": prompts,
            "judge_prompt_tokens": tokens, "rationale_tokens": now.rationale_tokens - before.rationale_tokens,
            "judge_seconds": round(seconds, 2), "labels_per_s": rate(pairs, 3),
            "judge_prompts_per_s": rate(prompts, 2), "judge_tokens_per_s": rate(tokens, 1)}


def preference_row(record: dict) -> dict:
    """The trl preference row of a label record: chosen is the side the soft label prefers."""
    a_wins = record["label"] >= 0.5
    flip = (lambda xs: xs) if a_wins else (lambda xs: [1 - x for x in xs])
    p = record["label"] if a_wins else 1 - record["label"]
    chosen, rejected = (record["a"], record["b"]) if a_wins else (record["b"], record["a"])
    ids = (record["a_id"], record["b_id"]) if a_wins else (record["b_id"], record["a_id"])
    as_a, as_b = (record["p_ab_a"], record["p_ba_b"]) if a_wins else (flip(record["p_ba_b"]), flip(record["p_ab_a"]))
    capped = min(p, 1 - _MARGIN_CAP)
    row = {"prompt": record["prompt"], "chosen": chosen, "rejected": rejected, "p_chosen": p,
           "margin": math.log(capped) - math.log1p(-capped), "principle_ids": record["principle_ids"],
           "p_chosen_by_principle": flip(record["principle_label"]), "p_chosen_as_a": as_a,
           "p_chosen_as_b": as_b, "pair_id": record["pair_id"], "prompt_id": record["prompt_id"],
           "chosen_id": ids[0], "rejected_id": ids[1]}
    if record["a_id"] == "input-chosen":
        row["agrees_with_input"] = a_wins
    for key, value in record["meta"].items():
        row[key if key not in row else f"input_{key}"] = value
    return row


def _finish(judge: ConstitutionalJudge, records: list[dict], summary: dict, store: RunStore | None) -> LabelResult:
    from datasets import Dataset

    rows = [preference_row(r) for r in records]
    summary.update(labels=len(records), principles_per_pair=judge.principles_per_pair,
                   aggregate=judge.config.aggregate, chain_of_thought=judge.config.chain_of_thought,
                   defend=judge.config.defend, options=judge.options.describe(),
                   constitution=judge.constitution.name, **label_stats(records))
    report = None
    if store:
        path = store.root / "preference" / "train-00000.jsonl"
        write_jsonl(path, rows)
        summary["files"] = {"preference": str(path)}
        report = write_report(store.root, summary, [r["p_chosen"] for r in rows])
        summary["files"]["report"] = str(report)
    return LabelResult(records, Dataset.from_list(rows), summary, report)


# ---------------------------------------------------------------- the report

CONFIDENCE_BINS = 10


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def label_stats(records: list[dict]) -> dict:
    """Position bias before averaging, label confidence and per-principle agreement of records."""
    if not records:
        return {}
    orders = [(ab, ba) for r in records for ab, ba in zip(r["p_ab_a"], r["p_ba_b"])]
    confidence = [max(r["label"], 1 - r["label"]) for r in records]
    histogram = [0] * CONFIDENCE_BINS
    for c in confidence:
        histogram[min(int((c - 0.5) * 2 * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)] += 1
    given = [r["label"] >= 0.5 for r in records if r["a_id"] == "input-chosen"]
    return {
        **({"agreement_with_input": _mean(given)} if given else {}),
        "order_flip_rate": _mean((ab > 0.5) != (ba > 0.5) for ab, ba in orders),
        "position_a_win_rate": _mean([ab > 0.5 for ab, _ in orders] + [ba < 0.5 for _, ba in orders]),
        "mean_p_position_a": _mean([ab for ab, _ in orders] + [1 - ba for _, ba in orders]),
        "mean_option_mass": _mean(m for r in records for pair in r["option_mass"] for m in pair),
        "mean_p_chosen": _mean(confidence),
        "confidence_histogram": histogram,
        "per_principle": per_principle_agreement(records),
    }


def per_principle_agreement(records: list[dict]) -> dict[str, dict]:
    """Per principle id: judgements, share agreeing with the pair's averaged label, order-flip rate."""
    table: dict[str, list] = {}
    for r in records:
        for pid, label, ab, ba in zip(r["principle_ids"], r["principle_label"], r["p_ab_a"], r["p_ba_b"]):
            table.setdefault(pid, []).append(((label > 0.5) == (r["label"] > 0.5), (ab > 0.5) != (ba > 0.5)))
    return {pid: {"n": len(rows), "agreement": sum(a for a, _ in rows) / len(rows),
                  "flip_rate": sum(f for _, f in rows) / len(rows)} for pid, rows in sorted(table.items())}


def summary_lines(s: dict) -> list[str]:
    """The headline of a labelling run, for the terminal and the top of the report."""
    lines = [f"{s['labels']} labels ({s.get('labels_from_earlier_run', 0)} from an earlier run), "
             f"{s['principles_per_pair']} principle(s) per pair, both orders, aggregate {s['aggregate']}"]
    if "prompts" in s:
        lines.append(f"{s['prompts']} prompts sampled ({s['prompts_sampled_now']} now, {s['sample_tokens']} "
                     f"tokens in {s['sampling_seconds']} s); pairs left out: {s['left_out_identical']} "
                     f"identical, {s['left_out_empty']} with an empty response")
    if s["labels"]:
        lines.append(f"position bias before averaging: single-order verdict flips on swap "
                     f"{s['order_flip_rate']:.1%}, first position wins {s['position_a_win_rate']:.1%}; "
                     f"mean p_chosen {s['mean_p_chosen']:.3f}")
    if "agreement_with_input" in s:
        lines.append(f"the judge keeps the input file's chosen response in {s['agreement_with_input']:.1%} of pairs")
    lines.append(f"judging: {s['labelled_now']} pairs, {s['judge_prompts']} judge prompts "
                 f"({s['judge_prompt_tokens']} tokens) in {s['judge_seconds']} s: {s['labels_per_s']} "
                 f"labels/s, {s['judge_tokens_per_s']} prompt tokens/s; total {s['seconds']} s")
    return lines


def write_report(root: Path, summary: dict, confidences: list[float]) -> Path:
    """report.md and label_confidence.png (of the p_chosen values) in the run folder; returns the
    report's path."""
    from .plots import histogram_png

    if confidences:
        histogram_png(confidences, root / "label_confidence.png", bins=CONFIDENCE_BINS,
                      value_range=(0.5, 1.0), title="RLAIF label confidence",
                      xlabel="p_chosen (soft label of the preferred response)", ylabel="pairs")
    path = root / "report.md"
    write_atomic(path, "\n".join(_report_markdown(summary)) + "\n")
    return path


def _report_markdown(s: dict) -> list[str]:
    lines = ["# RLAIF labelling report", "", *[f"- {line}" for line in summary_lines(s)],
             f"- constitution `{s['constitution']}`; chain of thought {'on' if s['chain_of_thought'] else 'off'}; "
             f"injection defence {'on' if s['defend'] else 'off'}", f"- option tokens: {s['options']}"]
    if not s["labels"]:
        return lines
    lines += ["", "## Position bias before averaging", "", "| statistic | value |", "| --- | --- |",
              f"| single-order verdict flips when the order is swapped | {s['order_flip_rate']:.1%} |",
              f"| first position (A) wins a single-order verdict | {s['position_a_win_rate']:.1%} |",
              f"| mean P(A) over both orders | {s['mean_p_position_a']:.3f} |",
              f"| mean probability on the two option tokens | {s['mean_option_mass']:.3f} |",
              "", "Both orders are averaged in every label, so this bias does not reach the labels.",
              "", "## Label confidence", "", "![label confidence](label_confidence.png)", "",
              "| p_chosen | pairs |", "| --- | --- |"]
    width = 0.5 / CONFIDENCE_BINS
    lines += [f"| {0.5 + i * width:.2f}–{0.5 + (i + 1) * width:.2f} | {n} |"
              for i, n in enumerate(s["confidence_histogram"])]
    lines += ["", "## Per-principle agreement", "",
              "| principle | judgements | agrees with the averaged label | single-order flip rate |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {pid} | {row['n']} | {row['agreement']:.1%} | {row['flip_rate']:.1%} |"
              for pid, row in s["per_principle"].items()]
    lines += ["", "## Time", "", f"- judging: {s['judge_seconds']} s for {s['labelled_now']} pairs, "
              f"{s['labels_per_s']} labels/s, {s['judge_prompts_per_s']} judge prompts/s, "
              f"{s['judge_tokens_per_s']} prompt tokens/s"]
    if "sampling_seconds" in s:
        lines.append(f"- sampling: {s['sampling_seconds']} s, {s['sample_tokens']} tokens")
    lines.append(f"- total: {s['seconds']} s")
    return lines
