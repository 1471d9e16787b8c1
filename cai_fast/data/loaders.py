"""Prompt sets and prompt loaders: any supported file in, a clean, reported list of prompts out.

`load_prompts(path_or_name)` reads one prompt source (plain text, JSONL, CSV, hh-rlhf, AdvBench YAML, Do-Not-Answer,
or a shipped set's name) and returns a `PromptSet`: the prompts, in file order, and a `LoadReport` of everything
that was dropped and why. Files are read as a stream: loading checks every record and keeps one bit a record
(kept or not) and 8 bytes a prompt (a digest, for duplicates), never the prompts; iterating a `PromptSet` reads
the file again (`Reread`), so memory stays flat however long the file. Nothing is dropped silently and nothing is
changed except surrounding whitespace; prompts are never truncated. Each `Prompt` has a stable id, the first 16
hex digits of sha256 of its stripped text, so the same file gives the same ids on every run (runs resume by these
ids). Malformed records raise `PromptLoadError` naming the file, the record and the field. Formats,
auto-detection and cleaning: see `load_prompts`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

PROMPT_SETS_DIR = Path(__file__).resolve().parents[1] / "prompt_sets"
FORMATS = ("auto", "text", "jsonl", "csv", "hh-rlhf", "advbench", "donotanswer")
DEFAULT_COLUMNS = ("prompt", "text", "instruction", "question", "turns")
ON_ERROR = ("raise", "skip")
REPORTED_LOCATIONS = 5  # how many drop locations a report keeps per reason
REPORTED_ERRORS = 10  # how many bad records one error message lists (all are counted)
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_SKIP_HINT = "fix the record, or pass on_error='skip' to drop bad records"


class PromptLoadError(ValueError):
    """A prompt source that cannot be read; the message names file, record and field."""

    def __init__(self, source: str, problem: str, hint: str, field: str | None = None):
        self.source = source
        self.field = field
        where = f"{source}: field '{field}'" if field else source
        super().__init__(f"{where}: {problem}; {hint}")


@dataclass(frozen=True)
class Prompt:
    """One prompt: stable content id, text, where it came from ("file:line"), extra fields."""

    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class LoadReport:
    """What a load kept and dropped; `*_at` keep the first few locations of each kind of drop."""

    origin: str
    fmt: str
    max_chars: int
    loaded: int = 0
    empty: int = 0
    duplicates: int = 0
    too_long: int = 0
    malformed: int = 0
    limit_reached: bool = False
    duplicates_at: list[str] = field(default_factory=list)
    too_long_at: list[str] = field(default_factory=list)
    malformed_at: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the CLI."""
        dropped = (f"dropped {self.duplicates} duplicates, {self.empty} empty, "
                   f"{self.too_long} over {self.max_chars} chars")
        if self.malformed:
            dropped += f", {self.malformed} malformed"
        limit = ", stopped at the limit" if self.limit_reached else ""
        return f"loaded {self.loaded} prompts from {self.origin} as {self.fmt} ({dropped}{limit})"


class Reread:
    """The records a validating pass over a file kept, read again from the file at every iteration, so that none
    is held: the pass calls `note(kept)` once for every item `read()` yields, which costs one bit; iterating
    yields `make(item)` for the kept ones and stops after the last. A file changed since the pass (size,
    modification time, for a directory its list of files) is refused, since its records were not checked."""

    def __init__(self, read: Callable[[], Iterator], make: Callable[[Any], Any], origin: Path):
        self._read, self._make, self._origin = read, make, origin
        self._stamp = _file_stamp(origin)
        self._bits, self._noted, self.count = bytearray(), 0, 0

    def note(self, kept: bool) -> None:
        if self._noted % 8 == 0:
            self._bits.append(0)
        if kept:
            self._bits[-1] |= 1 << self._noted % 8
            self.count += 1
        self._noted += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator:
        if _file_stamp(self._origin) != self._stamp:
            raise PromptLoadError(str(self._origin), "changed since it was loaded",
                                  "load it again, so that its records are checked")
        left = self.count
        items = self._read()
        for number, item in enumerate(items):
            if left == 0:
                break
            if self._bits[number >> 3] >> (number & 7) & 1:
                left -= 1
                yield self._make(item)
        items.close()


def _file_stamp(path: Path) -> list[tuple[str, int, int]]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    return [(str(f), s.st_size, s.st_mtime_ns) for f in files for s in [f.stat()]]


class PromptSet:
    """The prompts of one source, in order, with the report of their loading. A set loaded from a file holds no
    prompt (see `Reread`): iterate it; `prompts` and indexing read the whole set into a list."""

    def __init__(self, prompts: Reread | list[Prompt], report: LoadReport):
        self._prompts, self.report = prompts, report

    @property
    def prompts(self) -> list[Prompt]:
        return list(self._prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self._prompts)

    def __len__(self) -> int:
        return len(self._prompts)

    def __getitem__(self, index):
        if isinstance(self._prompts, Reread) and isinstance(index, int) and 0 <= index < len(self):
            return next(islice(self._prompts, index, None))  # reads up to it
        return self.prompts[index]


@dataclass(frozen=True)
class _Candidate:
    text: str
    source: str
    meta: dict[str, Any]


_Item = _Candidate | PromptLoadError  # readers yield bad records as errors; the collector decides


def prompt_id(text: str) -> str:
    """Stable id of a prompt: first 16 hex digits of sha256 of the stripped text."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def available_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with the package, for `load_prompts(name)`."""
    return sorted(p.stem for p in PROMPT_SETS_DIR.glob("*.jsonl"))


def load_prompts(path: str | Path, *, fmt: str = "auto", column: str | None = None,
                 limit: int | None = None, max_chars: int = 4000,
                 on_error: str = "raise") -> PromptSet:
    """Load prompts from a file, a Do-Not-Answer directory or a shipped set name.

    Formats (`fmt=`; "auto" picks one from the extension and the first record):
    - "text"        one prompt per line; blank lines are skipped, lines starting with '#' are comments.
    - "jsonl"       one JSON object per line; the prompt is `column` (default: the first of
                    prompt, text, instruction, question, turns found in the first record). A list
                    of strings in that column (MT-Bench `turns`) gives its first element.
    - "csv"         a header row and a named column (same defaults), read with the csv module.
                    Records are numbered by line; a quoted field spanning lines counts its last line.
    - "hh-rlhf"     JSONL of `chosen`/`rejected` transcripts ("\\n\\nHuman: … \\n\\nAssistant: …");
                    the prompt is the first Human turn of `chosen`.
    - "advbench"    the PyRIT YAML (`seeds: - value: …, harm_categories: […]`); needs PyYAML.
    - "donotanswer" JSONL of `{"prompt", "intents"}`, or a directory of such files, read in sorted
                    order; each prompt's meta gets the file stem as `risk_area`.
    Auto-detection: a directory is "donotanswer"; .txt is "text", .csv is "csv", .yaml/.yml is
    "advbench"; .jsonl/.json look at the first record: `chosen` holding "\\n\\nHuman:" is "hh-rlhf",
    `intents` is "donotanswer", anything else "jsonl". A bare name without extension or path
    separator that matches a shipped set ("red_team", "benign") loads that set from
    `cai_fast/prompt_sets/`; write "./red_team" to mean a local file of that name.

    Cleaning, in this order, each counted in the report: empty prompts (whitespace only) are
    dropped; prompts longer than `max_chars` characters after stripping are dropped and their
    locations reported, never truncated (a truncated request is a different request; token-level
    limits belong to the generator, which knows the tokenizer); duplicates (same text after
    collapsing runs of whitespace) are dropped, the first kept. `limit=N` keeps the first N prompts
    that survive cleaning and stops reading there, so records after them are not checked (nor decoded).

    Malformed records (a line that is not JSON, a missing column, a column that is not a string, a
    transcript with no Human turn) raise `PromptLoadError` naming the file, the line or record and
    the field, and saying what to do; with `on_error="skip"` they are dropped and counted instead.
    Problems with the file as a whole (missing, not UTF-8, a CSV without the column, no prompts at
    all) always raise.

    column: the field holding the prompt (jsonl, csv; also hh-rlhf's transcript field, default
    "chosen", advbench's default "value", donotanswer's default "prompt").
    limit: keep the first `limit` prompts after cleaning. max_chars: longer prompts are dropped.
    on_error: "raise" on a malformed record, or "skip" to drop it and count it in the report.
    """
    _check_options(fmt, limit, max_chars, on_error)
    resolved = _resolve_path(path)
    fmt = detect_format(resolved) if fmt == "auto" else fmt
    if fmt == "text" and column is not None:
        raise ValueError(f"column={column!r} has no meaning for plain text ({resolved}); "
                         "pass fmt='jsonl' or fmt='csv' for files with columns")
    report = LoadReport(origin=str(resolved), fmt=fmt, max_chars=max_chars)
    read = lambda: _READERS[fmt](resolved, column)  # noqa: E731
    kept = Reread(read, _prompt, resolved)
    for _, keep in _clean(read, report, limit, on_error):
        kept.note(keep)
    if not kept.count:
        raise PromptLoadError(str(resolved), f"no prompts left ({report.summary()})",
                              "check the file and the format/column options")
    return PromptSet(kept, report)


def prompts_from_texts(texts: Iterable[str], *, origin: str = "<list>", limit: int | None = None,
                       max_chars: int = 4000) -> PromptSet:
    """Clean a list of prompt strings exactly as `load_prompts` cleans a file."""
    _check_options("text", limit, max_chars, "raise")
    texts = list(texts)
    read = lambda: (_list_item(text, f"{origin}:{number}") for number, text in enumerate(texts, 1))  # noqa: E731
    report = LoadReport(origin=origin, fmt="list", max_chars=max_chars)
    return PromptSet([_prompt(item) for item, keep in _clean(read, report, limit, "raise") if keep], report)


def _list_item(text: Any, source: str) -> _Item:
    if isinstance(text, str):
        return _Candidate(text, source, {})
    return PromptLoadError(source, f"has type {type(text).__name__}, expected a string",
                           "pass a list of prompt strings")


def detect_format(path: str | Path) -> str:
    """The format name for `path`, from its extension and, for JSON, its first record."""
    path = Path(path)
    if path.is_dir():
        return "donotanswer"
    by_suffix = {".txt": "text", ".csv": "csv", ".yaml": "advbench", ".yml": "advbench"}
    suffix = path.suffix.lower()
    if suffix in by_suffix:
        return by_suffix[suffix]
    if suffix not in (".jsonl", ".json"):
        raise PromptLoadError(str(path), f"cannot tell the format from the extension '{suffix}'",
                              f"pass fmt= one of {', '.join(FORMATS[1:])}")
    return _detect_json_format(_first_json_record(path))


def _detect_json_format(record: Any) -> str:
    if not isinstance(record, dict):
        return "jsonl"
    if isinstance(record.get("chosen"), str) and "\n\nHuman:" in record["chosen"]:
        return "hh-rlhf"
    return "donotanswer" if "intents" in record else "jsonl"


def _first_json_record(path: Path) -> Any:
    for _, line in _numbered_lines(path):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return None  # the jsonl reader reports the bad line with its number
    return None


def _check_options(fmt: str, limit: int | None, max_chars: int, on_error: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; use one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of prompts, got {limit}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")


def _resolve_path(path: str | Path) -> Path:
    name = str(path)
    is_bare_name = "/" not in name and "\\" not in name and not Path(name).suffix
    if is_bare_name and name in available_prompt_sets():
        return PROMPT_SETS_DIR / f"{name}.jsonl"
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise PromptLoadError(name, "no such file or directory",
                              f"give a path to a prompt file, or a shipped set: "
                              f"{', '.join(available_prompt_sets())}")
    return resolved


def _clean(read: Callable[[], Iterator[_Item]], report: LoadReport, limit: int | None,
           on_error: str) -> Iterator[tuple[_Item, bool]]:
    """(item, whether it is kept) for each item of `read()`, filling `report`; stop at `limit`. Raises the
    malformed records (raise_collected) once the items are all seen. Duplicates are found by a 64-bit digest
    of each kept prompt (two different prompts share one with odds of ~n²/2⁶⁵, the prompt ids' odds); the
    first few are named with the prompt they repeat by reading the items again up to it."""
    seen = Digests()
    unnamed: list[tuple[int, int]] = []
    errors: list[PromptLoadError] = []
    for item in read():
        if isinstance(item, _Candidate) and "\x00" in item.text:
            item = PromptLoadError(item.source, "contains a NUL byte (\\x00)", "remove it; a prompt is text")
        if isinstance(item, PromptLoadError):
            _count_malformed(item, report, on_error, errors)
            yield item, False
        elif _accept(item, report, seen, unnamed):
            report.loaded += 1
            yield item, True
            if report.loaded == limit:
                report.limit_reached = True
                break
        else:
            yield item, False
    raise_collected(errors, report.origin)
    _name_first(report, unnamed, read())


def _prompt(candidate: _Candidate) -> Prompt:
    return Prompt(prompt_id(candidate.text), candidate.text.strip(), candidate.source, candidate.meta)


def raise_collected(errors: list[ValueError], origin: str, what: str = "bad records") -> None:
    """Raise the problems found in one file as one error of the first one's type: a single one as
    it is, several counted, with the first REPORTED_ERRORS of them; nothing when there are none.
    Every loader that checks a whole file (prompts, pairs, training data, pipeline configs) uses it."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        listed = " | ".join(str(e) for e in errors[:REPORTED_ERRORS])
        more = f" | and {len(errors) - REPORTED_ERRORS} more" if len(errors) > REPORTED_ERRORS else ""
        problem, hint, kind = f"{len(errors)} {what}: {listed}{more}", "fix every one of them", type(errors[0])
        if issubclass(kind, PromptLoadError):
            raise kind(origin, problem, hint)
        raise kind(f"{origin}: {problem}; {hint}")


def _count_malformed(error: PromptLoadError, report: LoadReport, on_error: str, errors: list) -> None:
    if on_error == "raise":
        errors.append(error)
        return
    report.malformed += 1
    _note(report.malformed_at, str(error))


def _accept(candidate: _Candidate, report: LoadReport, seen: Digests, unnamed: list[tuple[int, int]]) -> bool:
    """Whether a candidate is kept; counts the reason when it is not. A duplicate noted in the report is
    listed in `unnamed` (its place in duplicates_at, its digest) until `_name_first` names what it repeats."""
    text = candidate.text.strip()
    if not text:
        report.empty += 1
        return False
    if len(text) > report.max_chars:
        report.too_long += 1
        _note(report.too_long_at, f"{candidate.source} ({len(text)} chars)")
        return False
    digest = _dedup_digest(text)
    if digest in seen:
        report.duplicates += 1
        if len(report.duplicates_at) < REPORTED_LOCATIONS:
            unnamed.append((len(report.duplicates_at), digest))
            report.duplicates_at.append(candidate.source)
        return False
    seen.add(digest)
    return True


class Digests:
    """A growing set of 64-bit digests in ~8 bytes each: a sorted array, searched by bisection, and a set of
    the latest `BUFFER`, merged into the array (by numpy, imported then) when it is full."""

    BUFFER = 1 << 14

    def __init__(self):
        self._sorted, self._latest = array("Q"), set()

    def __contains__(self, digest: int) -> bool:
        if digest in self._latest:
            return True
        at = bisect_left(self._sorted, digest)
        return at < len(self._sorted) and self._sorted[at] == digest

    def add(self, digest: int) -> None:
        self._latest.add(digest)
        if len(self._latest) == self.BUFFER:
            import numpy as np

            merged = np.concatenate([np.frombuffer(self._sorted, np.uint64), np.fromiter(self._latest, np.uint64)])
            merged.sort(kind="stable")  # two sorted runs: a merge
            self._sorted, self._latest = array("Q"), set()
            self._sorted.frombytes(memoryview(merged).cast("B"))


def _dedup_digest(text: str) -> int:
    """64 bits of the text with runs of whitespace collapsed: two prompts that differ only there are duplicates."""
    return int.from_bytes(hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).digest(), "little")


def _name_first(report: LoadReport, unnamed: list[tuple[int, int]], items: Iterator[_Item]) -> None:
    """Adds "(same as SOURCE)" to each noted duplicate: the first kept prompt of its digest in `items`."""
    wanted: dict[int, list[int]] = {}
    for place, digest in unnamed:
        wanted.setdefault(digest, []).append(place)
    for item in items:
        if not wanted:
            break
        text = item.text.strip() if isinstance(item, _Candidate) and "\x00" not in item.text else ""
        if text and len(text) <= report.max_chars:
            for place in wanted.pop(_dedup_digest(text), []):
                report.duplicates_at[place] += f" (same as {item.source})"


def _note(locations: list[str], location: str) -> None:
    if len(locations) < REPORTED_LOCATIONS:
        locations.append(location)


# ---- readers: each yields _Candidate for a good record and PromptLoadError for a bad one ----

def _read_text_file(path: Path) -> str:
    """The whole file as text (for YAML, which is parsed whole), as `_text_lines` reads it."""
    return "".join(text_lines(path))


def text_lines(path: Path, error: type[PromptLoadError] = PromptLoadError) -> Iterator[str]:
    """The file's lines, read as they are needed: UTF-8 (a BOM is dropped), newlines ('\\r\\n', '\\r')
    normalised to '\\n' (no other line break: U+2028 is text), each line ending in '\\n' but the last when the
    file does not. A bad byte is an `error` naming the file and the byte's offset."""
    if path.is_dir():
        raise error(str(path), "is a directory, not a file",
                              "give a file, or fmt='donotanswer' for a directory of JSONL files")
    with open(path, "rb") as f:
        offset = 0  # bytes after the BOM, where a bad byte is counted from
        for raw in f:
            if offset == 0 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise error(str(path), f"is not UTF-8 text (bad byte at offset {offset + err.start})",
                            "save the file as UTF-8") from None
            offset += len(raw)
            *lines, last = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            yield from (line + "\n" for line in lines)
            if last:
                yield last


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every line that is not blank."""
    for number, line in enumerate(text_lines(path), 1):
        if line.strip():
            yield number, line.removesuffix("\n")


def _read_plain_text(path: Path, column: str | None) -> Iterator[_Item]:
    for number, line in _numbered_lines(path):
        if not line.lstrip().startswith("#"):
            yield _Candidate(line, f"{path}:{number}", {})


def _json_records(path: Path) -> Iterator[tuple[str, dict | PromptLoadError]]:
    """(source, record) per non-blank line; a line that is not a JSON object gives an error."""
    for number, line in _numbered_lines(path):
        source = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield source, PromptLoadError(source, f"not valid JSON ({err.msg}, column {err.colno})",
                                          f"expected one JSON object per line; {_SKIP_HINT}")
            continue
        if not isinstance(record, dict):
            yield source, PromptLoadError(source, f"a JSON {type(record).__name__}, not an object",
                                          f"expected one JSON object per line; {_SKIP_HINT}")
            continue
        yield source, record


def _read_jsonl(path: Path, column: str | None) -> Iterator[_Item]:
    for source, record in _json_records(path):
        if isinstance(record, PromptLoadError):
            yield record
            continue
        try:
            column = column or _default_column(record, source)
            yield _Candidate(_field_text(record, column, source), source, _meta(record, column))
        except PromptLoadError as err:
            yield err


def _default_column(record: dict, source: str) -> str:
    for name in DEFAULT_COLUMNS:
        if name in record:
            return name
    raise PromptLoadError(source, f"none of the fields {', '.join(DEFAULT_COLUMNS)} is present",
                          _column_hint(record))


def _column_hint(record: dict) -> str:
    found = ", ".join(str(key) for key in record) or "none"
    return f"pass column=NAME (CLI: --prompt-column NAME); fields found: {found}"


def _field_text(record: dict, column: str, source: str) -> str:
    """The prompt string in `record[column]`; a list of strings gives its first element."""
    if column not in record:
        raise PromptLoadError(source, "missing", _column_hint(record), field=column)
    value = record[column]
    if isinstance(value, list) and all(isinstance(turn, str) for turn in value):
        return value[0] if value else ""
    if not isinstance(value, str):
        raise PromptLoadError(source, f"has type {type(value).__name__}, expected a string",
                              _SKIP_HINT, field=column)
    return value


def _meta(record: dict, column: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key != column}


def _read_csv(path: Path, column: str | None) -> Iterator[_Item]:
    reader = csv.DictReader(text_lines(path), strict=True)
    try:
        column = _csv_column(path, reader.fieldnames or [], column)
        for row in reader:
            yield _csv_row(row, column, f"{path}:{reader.line_num}")
    except csv.Error as err:
        raise PromptLoadError(f"{path}:{reader.line_num + 1}",
                              f"the record starting on this line is not valid CSV ({err})",
                              "fix the file (quotes must be balanced)") from None


def _csv_column(path: Path, header: list[str], column: str | None) -> str:
    """The prompt column: `column` if given, else the first default name in the header."""
    chosen = column or next((name for name in DEFAULT_COLUMNS if name in header), None)
    if chosen in header:
        return chosen
    problem = (f"no column {column!r}" if column else
               f"none of the columns {', '.join(DEFAULT_COLUMNS)} is present")
    found = ", ".join(header) or "none (is the file empty?)"
    raise PromptLoadError(f"{path}:1", problem,
                          f"pass column=NAME (CLI: --prompt-column NAME); columns found: {found}")


def _csv_row(row: dict, column: str, source: str) -> _Item:
    if row[column] is None:
        return PromptLoadError(source, "missing (the row has fewer fields than the header)",
                               _SKIP_HINT, field=column)
    meta = {key: value for key, value in row.items() if key not in (column, None)}
    return _Candidate(row[column], source, meta)


def _read_hh_rlhf(path: Path, column: str | None) -> Iterator[_Item]:
    column = column or "chosen"
    for source, record in _json_records(path):
        if isinstance(record, PromptLoadError):
            yield record
            continue
        try:
            transcript = _field_text(record, column, source)
            yield _Candidate(_first_human_turn(transcript, source, column), source, {})
        except PromptLoadError as err:
            yield err


def transcript_messages(transcript: str) -> list[dict]:
    """hh-rlhf's "\\n\\nHuman: … \\n\\nAssistant: …" turns as chat messages (text before the first
    turn is dropped)."""
    parts = _TURN.split(transcript)[1:]
    return [{"role": "user" if speaker == "Human" else "assistant", "content": text.strip()}
            for speaker, text in zip(parts[::2], parts[1::2])]


def _first_human_turn(transcript: str, source: str, column: str) -> str:
    turns = [m["content"] for m in transcript_messages(transcript) if m["role"] == "user"]
    if not turns:
        raise PromptLoadError(source, "has no 'Human:' turn",
                              f"expected an hh-rlhf transcript ('\\n\\nHuman: ...'); {_SKIP_HINT}",
                              field=column)
    return turns[0]


def _read_advbench(path: Path, column: str | None) -> Iterator[_Item]:
    column = column or "value"
    for number, seed in enumerate(_advbench_seeds(path), 1):
        source = f"{path}:record {number}"
        if not isinstance(seed, dict):
            yield PromptLoadError(source, f"a seed is a {type(seed).__name__}, not a mapping",
                                  _SKIP_HINT)
            continue
        try:
            yield _Candidate(_field_text(seed, column, source), source, _meta(seed, column))
        except PromptLoadError as err:
            yield err


def _advbench_seeds(path: Path) -> list:
    try:
        import yaml
    except ImportError:
        raise PromptLoadError(str(path), "reading AdvBench YAML needs PyYAML",
                              "pip install pyyaml") from None
    try:
        document = yaml.safe_load(_read_text_file(path))
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())  # PyYAML's message spans lines; keep it on one
        raise PromptLoadError(str(path), f"not valid YAML ({problem})", "fix the file") from None
    seeds = document.get("seeds") if isinstance(document, dict) else None
    if not isinstance(seeds, list):
        raise PromptLoadError(str(path), "missing or not a list",
                              "expected the PyRIT AdvBench layout 'seeds: - value: ...'", "seeds")
    return seeds


def _read_donotanswer(path: Path, column: str | None) -> Iterator[_Item]:
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise PromptLoadError(str(path), "directory holds no .jsonl files",
                              "give the Do-Not-Answer folder or one of its .jsonl files")
    for file in files:
        for item in _read_jsonl(file, column or "prompt"):
            if isinstance(item, _Candidate):
                item.meta["risk_area"] = file.stem
            yield item


_READERS = {
    "text": _read_plain_text,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "hh-rlhf": _read_hh_rlhf,
    "advbench": _read_advbench,
    "donotanswer": _read_donotanswer,
}
