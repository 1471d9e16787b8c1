"""Training data: records read from JSONL, chats tokenized with the mask of trained tokens, batches.

Formats are trl's (`datasets.load_dataset("json", ...)` reads the same files): SFT `{"messages": [...]}` (trains on
every assistant turn) or `{"prompt": [...], "completion": [...]}` (trains on the completion's assistant turns);
preference `{"prompt", "chosen", "rejected", "p_chosen" (optional, default 1), "margin" (optional, default 0)}`.
Conversational fields are lists of messages; a plain string is one user turn (prompt) or one assistant turn.
`--data`: a file, a folder or a Hub dataset id (see `read_records`). Chats are tokenized as trl does (see
`tokenize_chat`); sequences longer than `max_length` keep their start. Every error names the file, the line and
the field, and says what to do; `tokenized_records` reports every bad record in one error (the first ten listed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data import raise_collected
from ..labelling.pairs import SAME_SIDES, same_response

ROLES = ("system", "user", "assistant")


class TrainDataError(ValueError):
    """A training file or record that cannot be used; the message says where and what to do."""


@dataclass(frozen=True)
class Record:
    where: str  # "FILE line N"
    fields: dict


@dataclass(frozen=True)
class TokenizedChat:
    ids: list[int]
    mask: list[bool]  # True on trained (scored) tokens

    @property
    def trained_tokens(self) -> int:
        """Tokens that are targets: a trained token at position 0 has no context, so it is not."""
        return sum(self.mask[1:])


@dataclass(frozen=True)
class PreferencePair:
    chosen: TokenizedChat  # prompt + chosen, mask on the chosen reply
    rejected: TokenizedChat
    p_chosen: float
    margin: float


BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def data_files(path: str | Path, subfolder: str) -> list[Path]:
    """The data files that `--data path` names, when it is a file or a folder (see `read_records`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    folder = path / subfolder if (path / subfolder).is_dir() else path
    for suffix in BUILDERS:  # one format per folder; JSONL first
        files = sorted(folder.glob(f"*{suffix}"))
        if files:
            return files
    raise TrainDataError(f"{folder}: no data files ({', '.join(f'*{x}' for x in BUILDERS)}) in this folder; pass "
                         f"--data with a file or a folder of them (an SL-CAI run folder has them under {subfolder}/)")


def read_records(path: str | Path, subfolder: str, errors: list | None = None) -> list[Record]:
    """Every record of the data, in order (JSONL: blank lines skipped). Lines that are not JSON
    objects raise one TrainDataError naming them all, or, given `errors`, are added to it.

    `--data` takes what `datasets.load_dataset` takes: a file (JSONL, JSON, CSV, parquet, arrow), a
    folder of them (a folder holding the stage's usual subfolder — an SL-CAI run folder holds
    `sft_messages/` and `preference/` — reads that subfolder), or a Hub dataset id (`name` or
    `name:split`, default split train). JSONL files are read here, line by line, so that errors
    name the line; the rest go through `datasets` and errors name the row.
    """
    check_data_path(path)
    files = data_files(path, subfolder) if Path(path).exists() else []
    bad: list[TrainDataError] = [] if errors is None else errors
    if files and files[0].suffix == ".jsonl":
        records = [record for file in files for record in _jsonl_records(file, bad)]
    else:
        records = _dataset_records(path, files)
    if errors is None:
        raise_collected(bad, str(path))
    if not records and not bad:
        raise TrainDataError(f"{path}: the data holds no records; pass --data with a non-empty file")
    return records


def tokenized_records(tokenizer, path: str | Path, subfolder: str, tokenize, max_length: int) -> list:
    """tokenize(tokenizer, record, max_length) of every record of the data, in order; every record
    that cannot be read or used raises, all of them in one TrainDataError (data.raise_collected)."""
    errors: list[TrainDataError] = []
    items = []
    for record in read_records(path, subfolder, errors):
        try:
            items.append(tokenize(tokenizer, record, max_length))
        except TrainDataError as err:
            errors.append(err)
    raise_collected(errors, str(path))
    return items


def check_data_path(path: str | Path) -> None:
    """TrainDataError when `path` names a local file or folder (a path or a data file's suffix)
    that does not exist; a Hub dataset id passes (it is checked when it loads)."""
    text = str(path)
    if not Path(path).exists() and (text.startswith(("/", ".", "~")) or Path(text).suffix in BUILDERS):
        raise TrainDataError(f"{path}: no such file or folder; pass --data with a data file, a folder of them "
                             "or a Hub dataset id")


def _jsonl_records(file: Path, errors: list) -> list[Record]:
    """The file's records; each line that is not a JSON object goes to `errors` instead."""
    records = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                if line.strip():
                    records.append(Record(f"{file} line {number}", _parse(line, f"{file} line {number}")))
            except TrainDataError as err:
                errors.append(err)
    return records


def _dataset_records(path: str | Path, files: list[Path]) -> list[Record]:
    """Rows through `datasets.load_dataset`: of local files, or of a Hub dataset `name[:split]`."""
    from datasets import load_dataset

    try:
        if files:
            rows = load_dataset(BUILDERS[files[0].suffix], data_files=[str(f) for f in files], split="train")
        else:
            name, _, split = str(path).partition(":")
            rows = load_dataset(name, split=split or "train")
    except Exception as err:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ...)
        raise TrainDataError(f"{path}: cannot load it as a data file, folder or Hub dataset ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); pass --data with a JSONL/JSON/CSV/"
                             "parquet/arrow file, a folder of them or a Hub dataset id") from None
    where = files[0] if len(files) == 1 else path
    return [Record(f"{where} row {i}", dict(row)) for i, row in enumerate(rows)]


def _parse(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise TrainDataError(f"{where}: not valid JSON ({err.msg}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise TrainDataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    return record


def messages_field(record: Record, name: str, role: str | None = None) -> list[dict]:
    """A field as a list of messages; a string becomes one message of `role`."""
    value = record.fields.get(name)
    if isinstance(value, str) and role:
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        kind = "missing" if value is None else f"a {type(value).__name__}"
        raise TrainDataError(f"{record.where}: field '{name}' must be a non-empty list of messages "
                             f"({{role, content}}){' or a string' if role else ''}, got {kind}")
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or message.get("role") not in ROLES
                or not isinstance(message.get("content"), str)):
            raise TrainDataError(f"{record.where}: field '{name}' message {i} must be "
                                 f"{{\"role\": one of {ROLES}, \"content\": a string}}, got {message!r:.80}")
    return value


def number_field(record: Record, name: str, default: float, low: float = -math.inf,
                 high: float = math.inf) -> float:
    value = record.fields.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise TrainDataError(f"{record.where}: field '{name}' must be a number in [{low}, {high}], "
                             f"got {value!r}; fix the record or drop the field")
    return float(value)


def sft_chat(record: Record) -> tuple[list[dict], int]:
    """(conversation, index of the first message whose assistant turns are trained)."""
    if "messages" in record.fields:
        return messages_field(record, "messages"), 0
    if "prompt" in record.fields and "completion" in record.fields:
        prompt = messages_field(record, "prompt", "user")
        return prompt + messages_field(record, "completion", "assistant"), len(prompt)
    raise TrainDataError(f"{record.where}: an SFT record needs a 'messages' field, or 'prompt' and "
                         f"'completion' fields; it has {sorted(record.fields)}")


def _assistant_turns(record: Record, chat: list[dict], first: int) -> list[int]:
    turns = [i for i in range(first, len(chat)) if chat[i]["role"] == "assistant"]
    if not turns:
        raise TrainDataError(f"{record.where}: the record has no assistant turn to train on; "
                             "add one or remove the record")
    return turns


def chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_chat(tokenizer, chat: list[dict], turns: Sequence[int], max_length: int) -> TokenizedChat:
    """Token ids of the whole chat, the assistant turns at indices `turns` marked as trained.

    As trl does it: the chat template renders the whole conversation once and the trained tokens of
    assistant turn i run from where the tokenized "messages[:i] + the generation prompt" stops being
    a prefix of it, to the end of the tokenized "messages[:i+1]". For a one-turn chat the untrained
    part is then exactly what `cai_fast.data.prompts.render` gives the generator.
    """
    ids = chat_ids(tokenizer, chat)
    mask = [False] * len(ids)
    for i in turns:
        start = common_prefix_length(chat_ids(tokenizer, chat[:i], generation_prompt=True), ids)
        end = common_prefix_length(chat_ids(tokenizer, chat[: i + 1]), ids)
        mask[start:end] = [True] * (end - start)
    return TokenizedChat(ids[:max_length], mask[:max_length])


def tokenize_sft(tokenizer, record: Record, max_length: int) -> TokenizedChat:
    chat, first = sft_chat(record)
    return tokenize_chat(tokenizer, chat, _assistant_turns(record, chat, first), max_length)


def preference_chats(record: Record) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) message lists of a preference record. A record whose chosen and
    rejected are the same response (up to whitespace) is refused: it prefers nothing."""
    for name in ("prompt", "chosen", "rejected"):
        if name not in record.fields:
            raise TrainDataError(f"{record.where}: a preference record needs 'prompt', 'chosen' and "
                                 f"'rejected' fields; '{name}' is missing")
    prompt = messages_field(record, "prompt", "user")
    chosen, rejected = messages_field(record, "chosen", "assistant"), messages_field(record, "rejected", "assistant")
    if same_response(chosen, rejected):
        raise TrainDataError(f"{record.where}: field 'rejected' {SAME_SIDES}; drop the record")
    return prompt, chosen, rejected


def tokenize_preference(tokenizer, record: Record, max_length: int) -> PreferencePair:
    prompt, chosen, rejected = preference_chats(record)
    sides = []
    for reply in (chosen, rejected):
        chat = prompt + reply
        sides.append(tokenize_chat(tokenizer, chat, _assistant_turns(record, chat, len(prompt)), max_length))
    return PreferencePair(*sides, number_field(record, "p_chosen", 1.0, 0.0, 1.0),
                          number_field(record, "margin", 0.0))


@dataclass
class TokenBatch:
    """Right-padded sequences: ids [B, T], attention_mask [B, T], loss_mask [B, T] (bool)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    @classmethod
    def collate(cls, chats: Sequence[TokenizedChat], pad_id: int, device) -> "TokenBatch":
        width = max(len(c.ids) for c in chats)
        ids = torch.full((len(chats), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chats), width), dtype=torch.long)
        mask = torch.zeros((len(chats), width), dtype=torch.bool)
        for row, chat in enumerate(chats):
            n = len(chat.ids)
            ids[row, :n] = torch.tensor(chat.ids)
            attention[row, :n] = 1
            mask[row, :n] = torch.tensor(chat.mask)
        return cls(ids.to(device), attention.to(device), mask.to(device))

    def targets(self, hidden: torch.Tensor):
        """(h [n, H], target ids [n], row of each [n]) for every trained token: the state at
        position t predicts the token at t + 1. Rows in order, positions increasing."""
        selected = self.loss_mask[:, 1:]
        return hidden[:, :-1][selected], self.input_ids[:, 1:][selected], selected.nonzero()[:, 0]
