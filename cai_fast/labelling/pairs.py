"""Pairs of responses to judge: loaded from files, or made from sampled responses.

`load_pairs(path)` reads trl preference JSONL (prompt/chosen/rejected, plain strings or lists of
{role, content} messages), SL-CAI's preference output, or hh-rlhf transcripts (chosen/rejected
only: the prompt is the conversation both share); a = the file's chosen, b = its rejected, and
errors name the file, the line and the field. `pairs_from_samples(records, k, seed)` makes the
pairs among each prompt's sampled responses (cai_fast.responses), all of them or k drawn by seed,
leaving out (and counting) pairs with an empty response or two identical ones (up to whitespace).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..data import prompts as P
from ..data import (ON_ERROR, Digests, PromptLoadError, Reread, prompt_id, raise_collected, text_lines,
                    transcript_messages)
from .trl_compat import response_text


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
_LAST_ANSWER = "\n\nAssistant:"


@dataclass
class PairSet:
    """The pairs of one file, in order, with what loading dropped. It holds no pair (cai_fast.data.Reread):
    iterating reads the file again; `pairs` reads them all into a list."""

    path: str
    kept: Reread
    duplicates: int = 0
    malformed: int = 0

    @property
    def pairs(self) -> list[Pair]:
        return list(self.kept)

    def __iter__(self):
        return iter(self.kept)

    def __len__(self) -> int:
        return len(self.kept)

    def summary(self) -> str:
        bad = f", {self.malformed} malformed records skipped" if self.malformed else ""
        return f"loaded {len(self)} pairs from {self.path} ({self.duplicates} duplicates dropped{bad})"


def load_pairs(path: str | Path, *, limit: int | None = None, on_error: str = "raise") -> PairSet:
    """Read a pairs file (see `_PAIR_HINT`); a = the file's chosen, b = its rejected.

    Duplicate pairs (same prompt, chosen and rejected) are dropped and counted. Malformed records
    (bad JSON, NaN or infinity, missing or empty fields, NUL bytes, chosen equal to rejected)
    raise one PairLoadError naming every line and field (data.raise_collected); on_error="skip"
    drops and counts them instead. The file is read as a stream: loading holds a bit a line and the
    64-bit id of each pair kept (data.Digests), never the pairs, and iterating the set reads the file again.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    file = Path(path)  # messages name `path` as given
    if not file.is_file():
        raise PairLoadError(str(path), "file not found", "check the path")
    kept = Reread(lambda: _pair_lines(file), lambda line: _pair_from_line(line[1], f"{path}:{line[0]}", None), file)
    result, seen, plain, errors = PairSet(str(path), kept), Digests(), None, []
    for number, line in _pair_lines(file):
        if len(kept) == limit:
            break
        try:
            pair = _pair_from_line(line, f"{path}:{number}", plain) if line.strip() else None
        except PairLoadError as err:
            errors.append(err)
            result.malformed += 1
            pair = None
        key = None if pair is None else int(pair.id, 16)
        result.duplicates += key in seen
        kept.note(key is not None and key not in seen)
        if key is not None:
            plain = isinstance(pair.prompt, str) if plain is None else plain
            seen.add(key)
    if on_error == "raise":
        raise_collected(errors, str(path))
    if not len(kept):
        raise PairLoadError(str(path), f"no pairs left ({result.summary()})", _PAIR_HINT)
    return result


def _pair_lines(path: Path):
    """(line number, line) for every line of a pairs file, read as they are needed."""
    for number, line in enumerate(text_lines(path, PairLoadError), 1):
        yield number, line.removesuffix("\n")


def _pair_from_line(line: str, where: str, plain: bool | None) -> Pair:
    try:
        record = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise PairLoadError(where, f"not valid JSON ({err.msg})", "fix the line") from None
    except ValueError as err:
        raise PairLoadError(where, str(err), "give finite numbers") from None
    if not isinstance(record, dict):
        raise PairLoadError(where, f"is a JSON {type(record).__name__}, not an object", _PAIR_HINT)
    if "prompt" not in record and all(_is_transcript(record.get(k)) for k in ("chosen", "rejected")):
        prompt, chosen, rejected = split_transcripts(record["chosen"], record["rejected"], where)
    else:
        prompt, chosen, rejected = (_pair_field(record, name, where) for name in PAIR_FIELDS)
    if plain is not None and isinstance(prompt, str) != plain:
        raise PairLoadError(where, "mixes plain-string and conversational records",
                            "write every record of the file in one of the two formats", field="prompt")
    _check_text(where, prompt, chosen, rejected)
    content = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]
    meta = {k: v for k, v in record.items() if k not in PAIR_FIELDS}
    return Pair(digest, prompt_id(P.conversation_text(prompt)), prompt, chosen, rejected,
                "input-chosen", "input-rejected", where, meta)


def _no_constant(name: str):
    raise ValueError(f"holds {name}, which is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"holds {text}, which is not a finite number")
    return value


def _check_text(where: str, prompt, chosen, rejected) -> None:
    """No NUL byte in any field, and two sides that differ beyond whitespace."""
    texts = (P.conversation_text(prompt), response_text(chosen), response_text(rejected))
    for name, text in zip(PAIR_FIELDS, texts):
        if "\x00" in text:
            raise PairLoadError(where, "contains a NUL byte (\\x00)", "remove it; the fields are text", field=name)
    if same_response(chosen, rejected):
        raise PairLoadError(where, SAME_SIDES, "drop the record", field="rejected")


SAME_SIDES = "is the same response as 'chosen' (up to whitespace), so the pair prefers nothing"


def same_response(a, b) -> bool:
    """Whether two responses (text or trl's message lists) are the same once runs of whitespace are
    collapsed: such a pair prefers nothing, so no loader or pair maker keeps one."""
    return " ".join(response_text(a).split()) == " ".join(response_text(b).split())


def _pair_field(record: dict, name: str, where: str):
    if name not in record:
        raise PairLoadError(where, "missing", _PAIR_HINT, field=name)
    value = record[name]
    if not is_text(value):
        raise PairLoadError(where, f"is {shown(value)}", "give a string or a list of {role, content} "
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


def pairs_from_samples(samples: list[dict], pairs_per_prompt: int, seed: int) -> tuple[list[Pair], dict]:
    """The pairs to judge among each prompt's samples, and how many were left out and why."""
    pairs, left_out = [], {"left_out_empty": 0, "left_out_identical": 0}
    for record in samples:
        texts, ids, pid = record["samples"], record["sample_ids"], record["prompt_id"]
        for i, j in _index_pairs(pid, len(texts), pairs_per_prompt, seed):
            a, b = texts[i].strip(), texts[j].strip()
            if not a or not b or same_response(a, b):
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

def is_text(value) -> bool:
    """A string, or a list of {role, content} messages."""
    return isinstance(value, str) or isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value)



def shown(value) -> str:
    return f"{type(value).__name__} {json.dumps(value, ensure_ascii=False, default=repr)[:60]}"
