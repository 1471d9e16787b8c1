"""Constitutions: the TOML schema, a validating loader, and seeded weighted principle sampling.

A constitution file holds `name`, `version`, `description`, an optional list of `[[few_shot]]` examples (prompt,
response, critique, revision, optional `principle` id) and at least one `[[principles]]` table (id, category,
weight, critique, revision, judge). Loading checks every field: unknown, missing, mistyped or empty fields,
duplicate ids, weights that are not finite and > 0, and few-shot examples naming an unknown principle each
raise `ConstitutionError` naming the file, the entry and the field; only the optional fields are defaulted.
Sampling is a pure function of (seed, key): the principle drawn for a record depends only on the run's seed and
that record's key (e.g. "prompt-17:round-2"), so resumed and re-batched runs draw the same principles.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_ID_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_TOP_FIELDS = {
    "name": str, "version": str, "description": str, "few_shot": list, "principles": list,
}
_FEW_SHOT_FIELDS = {
    "prompt": str, "response": str, "principle": str, "critique": str, "revision": str,
}
_PRINCIPLE_FIELDS = {
    "id": str, "category": str, "weight": float, "critique": str, "revision": str, "judge": str,
}
_OPTIONAL_FIELDS = {"few_shot", "principle", "principles"}  # no principles: its own message
_TYPE_HINTS = {str: "a quoted string", float: "a number", list: "an array of tables ([[...]])"}


class ConstitutionError(ValueError):
    """A constitution file or name that cannot be used; the message says where and what to do."""


@dataclass(frozen=True)
class Principle:
    id: str
    category: str
    weight: float
    critique: str
    revision: str
    judge: str


@dataclass(frozen=True)
class FewShotExample:
    prompt: str
    response: str
    critique: str
    revision: str
    principle: str | None


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str
    description: str
    principles: tuple[Principle, ...]
    few_shot: tuple[FewShotExample, ...]
    source: str

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(p.id for p in self.principles)

    def principle(self, id: str) -> Principle:
        """The principle with this id; ConstitutionError listing the valid ids if there is none."""
        for p in self.principles:
            if p.id == id:
                return p
        raise ConstitutionError(
            f"constitution {self.name!r} ({self.source}) has no principle {id!r}; "
            f"valid ids: {', '.join(self.ids)}"
        )

    def sample(self, key: str, k: int, *, seed: int, replace: bool = True) -> list[Principle]:
        """k principles drawn by weight, from an RNG that depends on (seed, key) only.

        replace=True: k independent weighted draws. replace=False: weighted sampling without
        replacement (each draw removes the chosen principle), so k <= len(principles).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConstitutionError(f"sample(k={k!r}): k must be an integer >= 1")
        if not replace and k > len(self.principles):
            raise ConstitutionError(
                f"sample(k={k}, replace=False): constitution {self.name!r} has only "
                f"{len(self.principles)} principles; lower k or use replace=True"
            )
        rng = random.Random(f"{seed}:{key}")
        if replace:
            return rng.choices(self.principles, weights=[p.weight for p in self.principles], k=k)
        pool = list(self.principles)
        drawn = []
        for _ in range(k):
            pick = rng.choices(range(len(pool)), weights=[p.weight for p in pool])[0]
            drawn.append(pool.pop(pick))
        return drawn

    def fingerprint(self) -> str:
        """sha256 (hex) of the content (everything but `source`), to record which one a run used."""
        content = dataclasses.asdict(dataclasses.replace(self, source=""))
        canonical = json.dumps(content, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _shipped_dir() -> Path | None:
    """The folder of shipped constitutions: inside the installed package, else the source tree."""
    here = Path(__file__).resolve().parents[1]  # cai_fast/
    for folder in (here / "constitutions", here.parent / "constitutions"):
        if folder.is_dir():
            return folder
    return None


def available_constitutions() -> list[str]:
    """Names of the constitutions shipped with cai_fast (usable as `load_constitution(name)`)."""
    folder = _shipped_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder else []


def load_constitution(name_or_path: str | Path) -> Constitution:
    """Load and validate a constitution from a .toml path or the name of a shipped one."""
    text = str(name_or_path)
    looks_like_path = text.endswith(".toml") or re.search(r"[/\\]", text)
    path = Path(text) if isinstance(name_or_path, Path) or looks_like_path else _shipped_path(text)
    if not path.is_file():
        raise ConstitutionError(f"{path}: constitution file not found; check the path")
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConstitutionError(f"{path}: not UTF-8 text ({exc}); save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConstitutionError(f"{path}: invalid TOML: {exc}; fix the syntax there") from None
    return constitution_from_dict(data, source=str(path))


def _shipped_path(name: str) -> Path:
    names = available_constitutions()
    if name not in names:
        raise ConstitutionError(
            f"unknown constitution {name!r}; shipped ones: {', '.join(names) or '(none found)'}. "
            "Pass one of these names or a path to a .toml file"
        )
    return _shipped_dir() / f"{name}.toml"


def constitution_from_dict(data: dict, source: str) -> Constitution:
    """Validate parsed TOML content (`source` names it in errors) and build the Constitution."""
    _check_table(data, _TOP_FIELDS, source, "top level")
    tables = data.get("principles", [])
    principles = tuple(_parse_principle(t, i, source) for i, t in enumerate(tables))
    if not principles:
        raise ConstitutionError(f"{source}: no principles; add at least one [[principles]] table")
    _check_unique_ids(principles, source)
    if not math.isfinite(sum(p.weight for p in principles)):
        raise ConstitutionError(f"{source}: the principles' weights add up to more than a float holds; "
                                "scale them down (only their ratios matter)")
    few_shot = tuple(
        _parse_few_shot(t, i, source, principles) for i, t in enumerate(data.get("few_shot", []))
    )
    header = (data["name"], data["version"], data["description"])
    return Constitution(*header, principles, few_shot, source)


def _parse_principle(table: object, index: int, source: str) -> Principle:
    raw_id = table.get("id") if isinstance(table, dict) else None
    good_id = isinstance(raw_id, str) and _ID_PATTERN.fullmatch(raw_id)
    where = f"principle {raw_id!r}" if good_id else f"principles[{index}]"
    _check_table(table, _PRINCIPLE_FIELDS, source, where)
    if not good_id:
        raise ConstitutionError(
            f"{source}: {where}, field 'id': {raw_id!r} is not a valid id; use lowercase "
            "letters, digits and single hyphens, e.g. 'harm-avoidance'"
        )
    if not (_finite(table["weight"]) and table["weight"] > 0):
        raise ConstitutionError(
            f"{source}: {where}, field 'weight': got {table['weight']!r}; set a finite number > 0"
        )
    return Principle(**{**table, "weight": float(table["weight"])})


def _finite(number: float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _check_unique_ids(principles: tuple[Principle, ...], source: str) -> None:
    first_index: dict[str, int] = {}
    for index, p in enumerate(principles):
        if p.id in first_index:
            raise ConstitutionError(
                f"{source}: principles[{index}], field 'id': duplicate id {p.id!r} (also "
                f"principles[{first_index[p.id]}]); give each principle a unique id"
            )
        first_index[p.id] = index


def _parse_few_shot(
    table: object, index: int, source: str, principles: tuple[Principle, ...]
) -> FewShotExample:
    where = f"few_shot[{index}]"
    _check_table(table, _FEW_SHOT_FIELDS, source, where)
    named = table.get("principle")
    ids = [p.id for p in principles]
    if named is not None and named not in ids:
        raise ConstitutionError(
            f"{source}: {where}, field 'principle': no principle has id {named!r}; "
            f"use one of: {', '.join(ids)} (or drop the field)"
        )
    return FewShotExample(**{"principle": None, **table})


def _check_table(table: object, schema: dict[str, type], source: str, where: str) -> None:
    """Unknown, missing, mistyped and empty fields of one table raise ConstitutionError."""
    if not isinstance(table, dict):
        raise ConstitutionError(f"{source}: {where}: expected a table, got {type(table).__name__}")
    for field in table:
        if field not in schema:
            close = difflib.get_close_matches(field, schema, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(schema)}"
            raise ConstitutionError(f"{source}: {where}, field {field!r}: unknown field; {hint}")
    for field, kind in schema.items():
        if field not in table:
            if field in _OPTIONAL_FIELDS:
                continue
            raise ConstitutionError(f"{source}: {where}, field {field!r}: missing; add it")
        _check_value(table[field], kind, source, f"{where}, field {field!r}")


def _check_value(value: object, kind: type, source: str, where: str) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number if kind is float else isinstance(value, kind)):
        raise ConstitutionError(
            f"{source}: {where}: expected {_TYPE_HINTS[kind]}, got {type(value).__name__} {value!r}"
        )
    if kind is str and not value.strip():
        raise ConstitutionError(f"{source}: {where}: empty; write some text")
