"""Training data: which tokens are trained, how --data is resolved, and errors that say where."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cai_fast.data.prompts import render
from cai_fast.train.data import (
    Record, TokenBatch, TrainDataError, data_files, read_records, tokenize_preference, tokenize_sft,
)

from helpers.rows import preference_rows, sft_rows, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_loaded):
    return tiny_loaded.tokenizer


def trained_text(tokenizer, chat) -> str:
    return tokenizer.decode([t for t, m in zip(chat.ids, chat.mask) if m])


def test_one_turn_trains_the_reply_and_its_end_and_the_prompt_is_what_the_generator_sees(tokenizer):
    row = sft_rows(3)[2]
    chat = tokenize_sft(tokenizer, Record("f line 1", row), 1024)
    assert trained_text(tokenizer, chat) == row["messages"][1]["content"] + "<|im_end|>\n"
    prompt = render(tokenizer, row["messages"][:1])
    assert chat.ids[: len(prompt)] == prompt and not any(chat.mask[: len(prompt)])
    assert all(chat.mask[len(prompt):])


def test_every_assistant_turn_of_messages_is_trained_and_no_user_turn(tokenizer):
    row = sft_rows(3)[1]
    chat = tokenize_sft(tokenizer, Record("f line 2", row), 1024)
    replies = [m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant"]
    assert trained_text(tokenizer, chat) == "".join(replies)
    assert row["messages"][2]["content"] not in trained_text(tokenizer, chat)


def test_prompt_completion_and_plain_strings_train_the_completion_only(tokenizer):
    conversational = sft_rows(3)[0]
    plain = {"prompt": conversational["prompt"][0]["content"], "completion": conversational["completion"][0]["content"]}
    a = tokenize_sft(tokenizer, Record("a", conversational), 1024)
    b = tokenize_sft(tokenizer, Record("b", plain), 1024)
    assert a == b
    assert trained_text(tokenizer, a) == plain["completion"] + "<|im_end|>\n"


def test_truncation_keeps_the_start(tokenizer):
    row = sft_rows(3)[1]
    full = tokenize_sft(tokenizer, Record("f", row), 1024)
    cut = tokenize_sft(tokenizer, Record("f", row), 17)
    assert cut.ids == full.ids[:17] and cut.mask == full.mask[:17]


def test_preference_pair_carries_soft_label_and_margin(tokenizer):
    row = {**preference_rows(1)[0], "p_chosen": 0.75, "margin": 1.1}
    pair = tokenize_preference(tokenizer, Record("f", row), 1024)
    assert (pair.p_chosen, pair.margin) == (0.75, 1.1)
    assert trained_text(tokenizer, pair.chosen) == row["chosen"][0]["content"] + "<|im_end|>\n"
    hard = tokenize_preference(tokenizer, Record("f", preference_rows(1)[0]), 1024)
    assert (hard.p_chosen, hard.margin) == (1.0, 0.0)


def test_batch_targets_are_the_trained_tokens_in_order(tokenizer):
    chats = [tokenize_sft(tokenizer, Record("f", r), 1024) for r in sft_rows(5, seed=3)]
    batch = TokenBatch.collate(chats, tokenizer.pad_token_id, "cpu")
    hidden = torch.randn(*batch.input_ids.shape, 7)
    h, targets, rows = batch.targets(hidden)
    expected = [t for c in chats for t, m in zip(c.ids[1:], c.mask[1:]) if m]
    assert targets.tolist() == expected
    assert rows.tolist() == [i for i, c in enumerate(chats) for _ in range(c.trained_tokens)]
    b, t = 3, chats[3].mask.index(True) - 1  # the state before row 3's first trained token
    assert torch.equal(h[rows.tolist().index(3)], hidden[b, t])


def test_data_folder_resolution(tmp_path):
    run = tmp_path / "sl-cai"
    write_jsonl(run / "records-00000.jsonl", [{"prompt_id": "x"}])
    write_jsonl(run / "sft_messages" / "train-00000.jsonl", sft_rows(2))
    write_jsonl(run / "preference" / "train-00000.jsonl", preference_rows(2))
    assert data_files(run, "sft_messages") == [run / "sft_messages" / "train-00000.jsonl"]
    assert data_files(run, "preference") == [run / "preference" / "train-00000.jsonl"]
    plain = write_jsonl(tmp_path / "flat" / "b.jsonl", sft_rows(1))
    write_jsonl(tmp_path / "flat" / "a.jsonl", sft_rows(1))
    assert data_files(tmp_path / "flat", "sft_messages") == [tmp_path / "flat" / "a.jsonl", plain]
    assert len(read_records(tmp_path / "flat", "sft_messages")) == 2


@pytest.mark.parametrize("line, kind, expected", [
    ("{not json", "sft", "line 2: not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "sft", "no assistant turn"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}), "sft", "field 'messages' message 0"),
    (json.dumps({"text": "hi"}), "sft", "needs a 'messages' field"),
    (json.dumps({"prompt": "a", "chosen": "b"}), "preference", "'rejected' is missing"),
    (json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "p_chosen": 1.5}), "preference",
     "field 'p_chosen' must be a number in [0.0, 1.0]"),
    (json.dumps({"prompt": "a", "chosen": [], "rejected": "c"}), "preference", "field 'chosen'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, tokenizer, line, kind, expected):
    good = sft_rows(1)[0] if kind == "sft" else preference_rows(1)[0]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    tokenize = tokenize_sft if kind == "sft" else tokenize_preference
    with pytest.raises(TrainDataError) as err:
        for record in read_records(path, kind):
            tokenize(tokenizer, record, 64)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and expected in str(err.value)


def test_missing_and_empty_data_say_what_to_do(tmp_path):
    with pytest.raises(TrainDataError, match="no such file or folder"):
        read_records(tmp_path / "nope.jsonl", "sft_messages")
    with pytest.raises(TrainDataError, match="no data files \\(\\*.jsonl, \\*.json, \\*.csv"):
        read_records(tmp_path, "sft_messages")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TrainDataError, match="no records"):
        read_records(tmp_path / "empty.jsonl", "sft_messages")


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "json", "csv"])
def test_data_in_any_format_datasets_reads(tmp_path, fmt):
    """--data takes what datasets.load_dataset takes: files of each format and folders of them
    give the records the JSONL file gives; a bad record names its row."""
    from datasets import Dataset

    rows = preference_rows(5, seed=8, p_chosen=0.7)
    if fmt == "csv":  # CSV holds strings: one user turn, one assistant turn each
        rows = [{k: v[0]["content"] if isinstance(v, list) else v for k, v in r.items()} for r in rows]
    dataset = Dataset.from_list(rows)
    folder = tmp_path / "folder" / "preference"
    folder.mkdir(parents=True)
    path = folder / f"train.{fmt}"
    {"parquet": dataset.to_parquet, "json": lambda f: dataset.to_json(f, lines=False), "csv": dataset.to_csv,
     "arrow": lambda f: _write_arrow(dataset, f)}[fmt](str(path))
    expected = [r.fields for r in read_records(write_jsonl(tmp_path / "rows.jsonl", rows), "preference")]
    for source in (path, tmp_path / "folder"):
        records = read_records(source, "preference")
        assert [r.fields for r in records] == expected
        assert records[3].where == f"{path} row 3"


def _write_arrow(dataset, path: str) -> None:
    import pyarrow as pa

    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, dataset.data.schema) as writer:
        writer.write_table(dataset.data.table)


def test_a_hub_id_goes_to_datasets_and_fails_offline_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrainDataError, match=r"^nobody/no-such-set: cannot load it .*Hub dataset id$"):
        read_records("nobody/no-such-set", "preference")


def test_a_base_model_without_chat_template_gets_chatml_with_a_warning(tiny_model_path, tmp_path):
    from transformers import AutoTokenizer

    from cai_fast.engine.loading import load_tokenizer

    folder = shutil.copytree(tiny_model_path, tmp_path / "base")  # a whole model folder: the loader checks it
    base = AutoTokenizer.from_pretrained(folder)
    base.chat_template = None
    base.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="no chat template; using ChatML"):
        tokenizer = load_tokenizer(str(folder))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
