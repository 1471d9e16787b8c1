"""Capability benchmarks: loading, answering and scoring, and the alignment tax.

Formats (`load_benchmark`): GSM8K-style JSONL (`question`, `answer` ending "#### N"), answered greedily and
scored by exact match of its final number; multiple-choice JSON (BIG-Bench-Hard: `examples: [{input, target}]`;
the options are the "(A)"-style labels listed after "Options:", else the task's 2 to 10 distinct targets, more
is a free-form task, refused) and TruthfulQA-style JSON (`{question, mc1_targets: {answer text: 0/1}}`, exactly
one 1; kind "mc1"), scored by each option's log-likelihood as the answer (`generator.score_options`).
Each benchmark is a seeded sample of `size` items (the same on every run with the same seed);
errors name the file, the record and the field (BenchmarkError).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Sequence

from ..data import prompts as P
from ..engine.base import SamplingParams
from ..seeding import seeded_sample
from ..stats import share

MAX_TARGETS = 10  # more distinct targets than this: a free-form task, not multiple choice


class BenchmarkError(ValueError):
    """A capability file that cannot be used; the message names the file, the record and the field."""


@dataclass(frozen=True)
class BenchmarkItem:
    id: str  # "<line or index>" in the file
    question: str
    target: str  # the final number (gsm8k) or the right option (multiple-choice)
    options: tuple[str, ...] = ()


@dataclass
class Benchmark:
    name: str
    kind: str  # "gsm8k", "multiple-choice" or "mc1" (TruthfulQA-style)
    path: str
    items: list[BenchmarkItem]
    total: int  # examples in the file


def load_benchmark(path: str | Path, size: int, seed: int = 0) -> Benchmark:
    """A capability set: .jsonl is GSM8K-style, .json multiple-choice (BIG-Bench-Hard or TruthfulQA
    style); `size` examples, seeded."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: benchmark file not found; check the path (relative paths are read "
                             "from the current folder)")
    readers = {".jsonl": lambda: ("gsm8k", _gsm8k_items(path)), ".json": lambda: _json_items(path)}
    if path.suffix not in readers:
        raise BenchmarkError(f"{path}: unknown benchmark format; give a GSM8K-style .jsonl (question, answer "
                             "ending '#### N'), a multiple-choice .json (examples: [{input, target}]) or a "
                             "TruthfulQA-style .json ([{question, mc1_targets}])")
    kind, items = readers[path.suffix]()
    if not items:
        raise BenchmarkError(f"{path}: the file holds no examples")
    return Benchmark(path.stem, kind, str(path), seeded_sample(items, size, seed, path.stem), len(items))


def _gsm8k_items(path: Path) -> list[BenchmarkItem]:
    items = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        record = _json(line, where)
        question, answer = (_text_field(record, name, where) for name in ("question", "answer"))
        target = answer.rsplit("####", 1)[-1].strip().replace(",", "") if "####" in answer else ""
        if _number(target) is None:
            raise BenchmarkError(f"{where}: field 'answer' must end with '#### N', N a number (GSM8K format), "
                                 f"got ...{answer[-40:]!r}; fix the record")
        items.append(BenchmarkItem(f"line {number}", question, target))
    return items


def _json_items(path: Path) -> tuple[str, list[BenchmarkItem]]:
    """("mc1", items) of a TruthfulQA-style list, else ("multiple-choice", items) of a BIG-Bench-Hard task."""
    data = _json(_read_text(path), str(path))
    if isinstance(data, list):
        return "mc1", [_mc1_item(path, i, record) for i, record in enumerate(data)]
    return "multiple-choice", _multiple_choice_items(path, data)


def _multiple_choice_items(path: Path, data) -> list[BenchmarkItem]:
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise BenchmarkError(f"{path}: field 'examples' must be a list of {{input, target}} objects "
                             "(BIG-Bench-Hard format), or the file a list of {question, mc1_targets} (TruthfulQA)")
    rows = []
    for i, example in enumerate(examples):
        where = f"{path} example {i}"
        if not isinstance(example, dict):
            raise BenchmarkError(f"{where}: must be an object with input and target")
        rows.append((_text_field(example, "input", where), _text_field(example, "target", where).strip()))
    targets = sorted({t for question, t in rows if not _listed_options(question)})
    return [_choice_item(path, i, question, target, targets) for i, (question, target) in enumerate(rows)]


def _mc1_item(path: Path, i: int, record) -> BenchmarkItem:
    """A TruthfulQA-style record: question, mc1_targets {answer text: 1 for the one true answer, else 0}."""
    where = f"{path} question {i}"
    question = _text_field(record, "question", where)
    targets = record.get("mc1_targets")
    right = [answer for answer, mark in targets.items() if mark == 1] if isinstance(targets, dict) else []
    if not isinstance(targets, dict) or len(targets) < 2 or len(right) != 1 or any(
            mark not in (0, 1) or not answer.strip() for answer, mark in targets.items()):
        raise BenchmarkError(f"{where}: field 'mc1_targets' must map 2 or more answer texts to 0 or 1, exactly "
                             f"one of them 1 (TruthfulQA format), got {str(targets)[:60]!r}; fix the record")
    return BenchmarkItem(f"question {i}", question, right[0], tuple(targets))


_OPTION_LINE = re.compile(r"^\s*(\([A-Z]\))", re.MULTILINE)


def _listed_options(question: str) -> tuple[str, ...]:
    """The "(A)"-style labels listed after "Options:" in a question (none when it lists none)."""
    return tuple(_OPTION_LINE.findall(question.split("Options:", 1)[1])) if "Options:" in question else ()


def options_of(question: str, task_targets: Sequence[str]) -> tuple[str, ...]:
    """The options of a multiple-choice question: "(A)" labels after "Options:", else the task's
    targets (the distinct targets of its questions that list no options)."""
    return _listed_options(question) or tuple(task_targets)


def _choice_item(path: Path, i: int, question: str, target: str, targets: list[str]) -> BenchmarkItem:
    options = options_of(question, targets)
    if not _listed_options(question) and not 2 <= len(targets) <= MAX_TARGETS:
        raise BenchmarkError(f"{path}: field 'target' takes {len(targets)} distinct values and the inputs list "
                             f"no 'Options:'; a multiple-choice set needs 2 to {MAX_TARGETS} options (free-form "
                             "tasks are not supported)")
    if target not in options:
        raise BenchmarkError(f"{path} example {i}: field 'target' {target!r} is not one of its options "
                             f"{list(options)}; fix the record")
    return BenchmarkItem(f"example {i}", question, target, options)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BenchmarkError(f"{path}: not UTF-8 text ({err}); save the file as UTF-8") from None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BenchmarkError(f"{where}: not valid JSON ({err.msg}, line {err.lineno}); fix it") from None


def _text_field(record, name: str, where: str) -> str:
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value.strip():
        shown = "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise BenchmarkError(f"{where}: field '{name}' must be a non-empty string, got {shown}")
    return value


_NUMBER_TEXT = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer is\s*[:=]?\s*\$?\s*(" + _NUMBER_TEXT + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*\$?\s*(" + _NUMBER_TEXT + ")")
_ANY_NUMBER = re.compile(_NUMBER_TEXT)


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def final_number(text: str) -> str | None:
    """The answer number of a response: after the last "answer is", else after "####", else the
    last number in the text; commas removed. None when the text has no number."""
    for pattern in (_ANSWER_IS, _HASHES, _ANY_NUMBER):
        found = pattern.findall(text)
        if found:
            return found[-1].replace(",", "").rstrip(".")
    return None


def same_number(prediction: str | None, target: str) -> bool:
    a, b = (_number(x) if x is not None else None for x in (prediction, target))
    return a is not None and b is not None and a == b


def gsm8k_prompt(question: str) -> str:
    return f"{question}\nSolve it step by step, then end with: The answer is <number>."


def multiple_choice_prompt(item: BenchmarkItem) -> str:
    return f"{item.question}\n\nAnswer with one of: {', '.join(item.options)}."


def answer_gsm8k(generator, items: Sequence[BenchmarkItem], max_tokens: int, seed: int) -> list[dict]:
    """Greedy answers; each record: id, prediction (final number), correct, response."""
    ids = [P.render(generator.tokenizer, [P.user(gsm8k_prompt(item.question))]) for item in items]
    out = generator.generate(ids, SamplingParams(max_tokens, 0.0, 1.0, seed))
    return [{"id": item.id, "target": item.target, "prediction": final_number(c.text),
             "correct": same_number(final_number(c.text), item.target), "response": c.text}
            for item, c in zip(items, out)]


def answer_multiple_choice(generator, items: Sequence[BenchmarkItem]) -> list[dict]:
    """The option with the highest log-likelihood as the answer; each record: id, prediction,
    correct, option log-probs."""
    records = {}
    groups: dict[tuple, list[BenchmarkItem]] = {}
    for item in items:
        groups.setdefault(item.options, []).append(item)
    tokenizer = generator.tokenizer
    for options, group in groups.items():
        option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        prompts = [P.render(tokenizer, [P.user(multiple_choice_prompt(item))]) for item in group]
        logp = generator.score_options(prompts, option_ids)
        for item, row in zip(group, logp.tolist()):
            best = options[max(range(len(options)), key=row.__getitem__)]
            records[item.id] = {"id": item.id, "target": item.target, "prediction": best,
                                "correct": best == item.target, "option_logprobs": row}
    return [records[item.id] for item in items]


def capability_scores(capability: dict[str, list[dict]]) -> dict[str, dict]:
    """Per benchmark: score (accuracy), n and the score's binomial standard error."""
    scores = {}
    for name, records in capability.items():
        if records:
            s = share(sum(r["correct"] for r in records), len(records))
            scores[name] = {"score": s["rate"], "n": s["n"], "stderr": s["stderr"]}
    return scores


def alignment_tax(base: dict[str, float], aligned: dict[str, float]) -> dict:
    """Per benchmark: base and aligned scores, tax = (base − aligned) / base (None when base is 0)
    and whether it is a regression, an improvement or unchanged. On average: the mean scores and
    `mean_tax`, the tax of the mean scores (a mean of the per-benchmark ratios would let one
    benchmark near 0, e.g. 0.04 -> 0.17 = -300%, swamp the others)."""
    def tax(b: float, a: float) -> float | None:
        return (b - a) / b if b > 0 else None

    rows = {}
    for name in base:
        b, a = base[name], aligned[name]
        change = "regression" if a < b else "improvement" if a > b else "unchanged"
        rows[name] = {"base": b, "aligned": a, "tax": tax(b, a), "change": change}
    if not base:
        return {"benchmarks": rows, "mean_tax": None, "mean_base": None, "mean_aligned": None}
    mean_base, mean_aligned = sum(base.values()) / len(base), sum(aligned.values()) / len(aligned)
    return {"benchmarks": rows, "mean_tax": tax(mean_base, mean_aligned), "mean_base": mean_base,
            "mean_aligned": mean_aligned}
