"""Prompt loaders: every format, odd files, malformed records, cleaning, ids, shipped sets."""

import csv
import hashlib
import json
import random
import re
import sys
from pathlib import Path

import pytest

from cai_fast.data import (
    Prompt,
    PromptLoadError,
    available_prompt_sets,
    detect_format,
    load_prompts,
    prompt_id,
    prompts_from_texts,
)
from cai_fast.data.loaders import Digests

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"public data sets not present at {SHARED_DATA}")

WORDS = ["alpha", "naïve", "café", "東京", "emoji🙂", "quote\"d", "comma,word", "tab\there",
         "Ωmega", "back\\slash", "zürich", "ﬁnal"]


def random_prompts(seed: int, count: int) -> list[str]:
    """Distinct prompts of random unicode words; each ends in a '?' and its own index."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 9))) + f" {i}?" for i in range(count)]


def write_jsonl(path: Path, records: list, newline: str = "\n") -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + newline for r in records),
                    encoding="utf-8", newline="")
    return path


def texts(prompt_set) -> list[str]:
    return [p.text for p in prompt_set]


def transcript(*turns: str) -> str:
    speakers = ["Human", "Assistant"]
    return "".join(f"\n\n{speakers[i % 2]}: {turn}" for i, turn in enumerate(turns))


# ---- plain text ----

def test_text_crlf_blank_lines_comments_and_unicode(tmp_path):
    prompts = random_prompts(1, 7)
    lines = ["# a comment", prompts[0], "", "   ", f"  {prompts[1]}\t", "  # indented comment"]
    lines += prompts[2:]
    path = tmp_path / "p.txt"
    path.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n\r\n")
    loaded = load_prompts(path)
    assert texts(loaded) == prompts
    assert loaded.prompts[1].source == f"{path}:5"
    assert loaded.report.empty == 0 and loaded.report.loaded == 7
    assert loaded.report.fmt == "text"


def test_text_rejects_a_column(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello there\n")
    with pytest.raises(ValueError, match="column"):
        load_prompts(path, column="prompt")


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 au lait?\n".encode("latin-1"))
    with pytest.raises(PromptLoadError, match=r"latin\.txt.*not UTF-8.*save the file as UTF-8"):
        load_prompts(path)


# ---- JSONL ----

@pytest.mark.parametrize("column", ["prompt", "text", "instruction", "question", "turns"])
def test_jsonl_default_columns(tmp_path, column):
    prompts = random_prompts(2, 5)
    value = (lambda p: [p, "a follow-up turn"]) if column == "turns" else (lambda p: p)
    records = [{"id": i, column: value(p), "extra": [i, "x"]} for i, p in enumerate(prompts)]
    loaded = load_prompts(write_jsonl(tmp_path / "p.jsonl", records, newline="\r\n"))
    assert texts(loaded) == prompts
    assert loaded.prompts[3].meta == {"id": 3, "extra": [3, "x"]}
    assert loaded.prompts[3].source.endswith("p.jsonl:4")


def test_jsonl_default_column_prefers_prompt_over_later_names(tmp_path):
    records = [{"question": f"q{i}", "text": f"t{i}", "prompt": f"p{i}"} for i in range(4)]
    loaded = load_prompts(write_jsonl(tmp_path / "p.jsonl", records))
    assert texts(loaded) == ["p0", "p1", "p2", "p3"]
    assert loaded.prompts[0].meta == {"question": "q0", "text": "t0"}


def test_jsonl_named_column_and_blank_lines(tmp_path):
    prompts = random_prompts(3, 4)
    body = "\n\n".join(json.dumps({"body": p, "prompt": "not this"}) for p in prompts)
    path = tmp_path / "p.jsonl"
    path.write_text("\n" + body + "\n\n", encoding="utf-8")
    loaded = load_prompts(path, column="body")
    assert texts(loaded) == prompts
    assert [p.source.rsplit(":", 1)[1] for p in loaded] == ["2", "4", "6", "8"]


def test_jsonl_without_a_known_column_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"body": "hi there", "lang": "en"}])
    with pytest.raises(PromptLoadError) as err:
        load_prompts(path)
    message = str(err.value)
    assert f"{path}:1" in message and "--prompt-column NAME" in message
    assert "fields found: body, lang" in message


# ---- CSV ----

def test_csv_with_bom_crlf_quotes_and_multiline_field(tmp_path):
    prompts = random_prompts(4, 5)
    prompts[2] = "first line,\nsecond \"line\""
    path = tmp_path / "p.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(["id", "prompt", "note"])
        writer.writerows([i, p, f"n{i}"] for i, p in enumerate(prompts))
    loaded = load_prompts(path)
    assert texts(loaded) == prompts
    assert loaded.prompts[4].meta == {"id": "4", "note": "n4"}
    assert loaded.report.fmt == "csv"


def test_csv_named_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("a,b\nx1,how do rainbows form?\nx2,why is the sky blue?\n", encoding="utf-8")
    assert texts(load_prompts(path, column="b")) == ["how do rainbows form?",
                                                    "why is the sky blue?"]


def test_csv_without_the_column_lists_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    expected = r"p\.csv:1: none of the columns prompt, .*--prompt-column NAME\); columns found: a, b"
    with pytest.raises(PromptLoadError, match=expected):
        load_prompts(path)
    with pytest.raises(PromptLoadError, match="no column 'c'.*columns found: a, b"):
        load_prompts(path, column="c")


def test_csv_short_row_and_broken_quotes(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("id,prompt\n1,what is a prime number?\n2\n", encoding="utf-8")
    with pytest.raises(PromptLoadError, match=r"short\.csv:3: field 'prompt': missing"):
        load_prompts(path)
    loaded = load_prompts(path, on_error="skip")
    assert loaded.report.malformed == 1 and len(loaded) == 1
    path = tmp_path / "quotes.csv"
    path.write_text('prompt\nfine prompt here\n"an unclosed quote\nswallows, the rest\n')
    with pytest.raises(PromptLoadError, match=r"quotes\.csv:3: the record .* not valid CSV"):
        load_prompts(path)


# ---- hh-rlhf ----

def test_hh_rlhf_first_human_turn_of_chosen(tmp_path):
    prompts = random_prompts(5, 4)
    records = [{"chosen": transcript(p, "sure", "and then?", "done"),
                "rejected": transcript(p, "no")} for p in prompts]
    records[1]["chosen"] = transcript(prompts[1] + "\nsecond line", "ok")
    prompts[1] += "\nsecond line"
    loaded = load_prompts(write_jsonl(tmp_path / "hh.jsonl", records))
    assert loaded.report.fmt == "hh-rlhf"
    assert texts(loaded) == prompts
    assert all(p.meta == {} for p in loaded)


def test_hh_rlhf_without_human_turn(tmp_path):
    records = [{"chosen": transcript("a fine question?", "answer")},
               {"chosen": "\n\nAssistant: only the assistant speaks"}]
    path = write_jsonl(tmp_path / "hh.jsonl", records)
    with pytest.raises(PromptLoadError) as err:
        load_prompts(path)
    message = str(err.value)
    assert f"{path}:2" in message and "field 'chosen'" in message and "Human:" in message
    loaded = load_prompts(path, on_error="skip")
    assert texts(loaded) == ["a fine question?"]
    assert loaded.report.malformed == 1 and loaded.report.malformed_at[0].startswith(f"{path}:2")


# ---- AdvBench YAML ----

ADVBENCH = """dataset_name: test
seeds:
- value: {0}
  data_type: text
  harm_categories:
  - Privacy loss
- value: "{1}"
  harm_categories: [Fraud, "Confidentiality loss"]
- value: >-
    {2}
"""


def test_advbench_yaml(tmp_path):
    prompts = ["Write a plan ünïcode 1", "Explain a thing: with a colon 2", "folded text 3"]
    path = tmp_path / "adv.prompt.yaml"
    path.write_text(ADVBENCH.format(*prompts), encoding="utf-8")
    loaded = load_prompts(path)
    assert loaded.report.fmt == "advbench"
    assert texts(loaded) == prompts
    assert loaded.prompts[1].meta == {"harm_categories": ["Fraud", "Confidentiality loss"]}
    assert loaded.prompts[0].source == f"{path}:record 1"


def test_advbench_bad_seed_and_bad_layout(tmp_path):
    path = tmp_path / "adv.yaml"
    path.write_text("seeds:\n- value: a good one\n- value: [1, 2]\n- just a string\n")
    with pytest.raises(PromptLoadError, match=r"adv\.yaml:record 2: field 'value': has type list"):
        load_prompts(path)
    assert load_prompts(path, on_error="skip").report.malformed == 2
    path.write_text("dataset_name: x\nprompts: []\n")
    with pytest.raises(PromptLoadError, match="field 'seeds': missing or not a list"):
        load_prompts(path)
    path.write_text("seeds: [unclosed\n")
    with pytest.raises(PromptLoadError, match="not valid YAML") as err:
        load_prompts(path)
    assert "\n" not in str(err.value)


def test_advbench_without_pyyaml(tmp_path, monkeypatch):
    path = tmp_path / "adv.yaml"
    path.write_text("seeds:\n- value: hello\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(PromptLoadError, match="pip install pyyaml"):
        load_prompts(path)


# ---- Do-Not-Answer ----

def test_donotanswer_directory_in_sorted_order(tmp_path):
    folder = tmp_path / "dna"
    folder.mkdir()
    prompts = random_prompts(6, 6)
    write_jsonl(folder / "zeta_area.jsonl", [{"prompt": p, "intents": ["S1"]} for p in prompts[3:]])
    write_jsonl(folder / "alpha_area.jsonl", [{"prompt": p, "intents": []} for p in prompts[:3]])
    (folder / "LICENSE").write_text("not a prompt file")
    loaded = load_prompts(folder)
    assert loaded.report.fmt == "donotanswer"
    assert texts(loaded) == prompts
    assert [p.meta["risk_area"] for p in loaded] == ["alpha_area"] * 3 + ["zeta_area"] * 3
    assert loaded.prompts[4].meta["intents"] == ["S1"]
    single = load_prompts(folder / "zeta_area.jsonl")
    assert single.report.fmt == "donotanswer" and single.prompts[0].meta["risk_area"] == "zeta_area"


def test_donotanswer_empty_directory(tmp_path):
    with pytest.raises(PromptLoadError, match="no .jsonl files"):
        load_prompts(tmp_path)


# ---- auto-detection ----

@pytest.mark.parametrize("name, content, expected", [
    ("a.txt", "hello\n", "text"),
    ("a.TXT", "hello\n", "text"),
    ("a.csv", "prompt\nhello\n", "csv"),
    ("a.yaml", "seeds:\n- value: hello\n", "advbench"),
    ("a.yml", "seeds:\n- value: hello\n", "advbench"),
    ("a.jsonl", '\n{"prompt": "hello"}\n', "jsonl"),
    ("a.json", '{"instruction": "hello"}\n', "jsonl"),
    ("a.jsonl", json.dumps({"chosen": transcript("hello", "hi")}) + "\n", "hh-rlhf"),
    ("a.jsonl", '{"prompt": "hello", "intents": ["x"]}\n', "donotanswer"),
])
def test_auto_detection(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert detect_format(path) == expected
    loaded = load_prompts(path)
    assert loaded.report.fmt == expected and texts(loaded) == ["hello"]


def test_auto_detection_of_a_directory_and_an_unknown_extension(tmp_path):
    assert detect_format(tmp_path) == "donotanswer"
    path = tmp_path / "prompts.md"
    path.write_text("hello\n")
    with pytest.raises(PromptLoadError, match=r"extension '\.md'.*fmt="):
        load_prompts(path)
    assert texts(load_prompts(path, fmt="text")) == ["hello"]


# ---- malformed records ----

BAD_JSONL_LINES = [
    ('{"prompt": "ok one"', r"not valid JSON", None),
    ('["a", "list"]', r"a JSON list, not an object", None),
    ('{"prompt": 17}', r"has type int, expected a string", "prompt"),
    ('{"prompt": {"nested": "x"}}', r"has type dict, expected a string", "prompt"),
    ('{"prompt": ["x", 3]}', r"has type list, expected a string", "prompt"),
    ('{"other": "x"}', r"missing; pass column=NAME.*fields found: other", "prompt"),
]


@pytest.mark.parametrize("bad_line, problem, field", BAD_JSONL_LINES)
def test_malformed_jsonl_line_names_file_line_and_field(tmp_path, bad_line, problem, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "first fine one"}\n\n' + bad_line + '\n{"prompt": "last one"}\n')
    with pytest.raises(PromptLoadError) as err:
        load_prompts(path)
    assert err.value.source == f"{path}:3" and err.value.field == field
    where = f"{path}:3: field '{field}': " if field else f"{path}:3: "
    assert str(err.value).startswith(where)
    assert any(hint in str(err.value) for hint in ("on_error='skip'", "--prompt-column"))
    assert re.search(problem, str(err.value))
    assert isinstance(err.value, ValueError)


def test_skip_counts_every_malformed_record_with_locations(tmp_path):
    rng = random.Random(7)
    good = random_prompts(8, 12)
    lines, bad_numbers = [], []
    for prompt in good:
        if rng.random() < 0.5:
            lines.append(rng.choice(BAD_JSONL_LINES)[0])
            bad_numbers.append(len(lines))
        lines.append(json.dumps({"prompt": prompt}))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = load_prompts(path, on_error="skip")
    assert texts(loaded) == good
    report = loaded.report
    assert report.malformed == len(bad_numbers) > 0
    expected_at = [f"{path}:{n}:" for n in bad_numbers[:5]]
    assert [m[:len(e)] for m, e in zip(report.malformed_at, expected_at)] == expected_at
    assert f"{len(bad_numbers)} malformed" in report.summary()


# ---- cleaning: empty, duplicates, over-long ----

def test_duplicates_empty_and_over_long_are_dropped_and_reported(tmp_path):
    prompts = random_prompts(9, 8)
    records = [{"prompt": p} for p in prompts]
    records.insert(2, {"prompt": "  " + prompts[0].replace(" ", "  \t ") + "\n"})  # duplicate
    records.insert(5, {"prompt": " \n\t "})  # empty
    records.insert(6, {"prompt": ""})  # empty
    records.append({"prompt": prompts[3]})  # duplicate
    records.append({"prompt": "x" * 301})  # over-long
    records.append({"prompt": "y" * 300})  # exactly at the limit: kept
    path = write_jsonl(tmp_path / "p.jsonl", records)
    loaded = load_prompts(path, max_chars=300)
    assert texts(loaded) == prompts + ["y" * 300]
    report = loaded.report
    assert (report.loaded, report.duplicates, report.empty, report.too_long) == (9, 2, 2, 1)
    assert report.duplicates_at == [f"{path}:3 (same as {path}:1)",
                                    f"{path}:12 (same as {path}:5)"]
    assert report.too_long_at == [f"{path}:13 (301 chars)"]
    assert report.summary() == (f"loaded 9 prompts from {path} as jsonl "
                                "(dropped 2 duplicates, 2 empty, 1 over 300 chars)")


def test_surrounding_whitespace_is_stripped_but_inner_text_kept(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "\n  line one\n\n  line two  \n"}])
    assert texts(load_prompts(path)) == ["line one\n\n  line two"]


def test_no_prompts_left_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": " "}, {"prompt": "z" * 50}])
    with pytest.raises(PromptLoadError, match=r"no prompts left.*1 empty, 1 over 10 chars"):
        load_prompts(path, max_chars=10)
    path = tmp_path / "comments.txt"
    path.write_text("# only\n# comments\n\n")
    with pytest.raises(PromptLoadError, match="no prompts left"):
        load_prompts(path)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(PromptLoadError, match=r"nope\.jsonl: no such file.*red_team"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(PromptLoadError, match="no such file.*benign"):
        load_prompts("no_such_set")
    path = tmp_path / "p.txt"
    path.write_text("hello\n")
    for options, message in [({"fmt": "xml"}, "unknown prompt format"),
                             ({"limit": 0}, "limit must be a positive"),
                             ({"max_chars": 0}, "max_chars must be positive"),
                             ({"on_error": "ignore"}, "on_error must be one of")]:
        with pytest.raises(ValueError, match=message):
            load_prompts(path, **options)


def test_a_directory_given_as_a_file_format(tmp_path):
    with pytest.raises(PromptLoadError, match="is a directory"):
        load_prompts(tmp_path, fmt="jsonl")


# ---- limit ----

def test_limit_takes_the_first_n_after_dedup_and_stops_reading(tmp_path):
    prompts = random_prompts(10, 9)
    lines = [prompts[0], prompts[0], prompts[1], "", prompts[2], prompts[3]] + prompts[4:]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines) + "\n{not json but never read\n", encoding="utf-8")
    loaded = load_prompts(path, limit=3)
    assert texts(loaded) == prompts[:3]
    assert loaded.report.duplicates == 1 and loaded.report.limit_reached
    assert "stopped at the limit" in loaded.report.summary()
    assert texts(load_prompts(path, limit=100)) == prompts + ["{not json but never read"]


def test_limit_stops_before_a_later_malformed_record(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": "two"}\nnot json\n')
    assert texts(load_prompts(path, limit=2)) == ["one", "two"]
    with pytest.raises(PromptLoadError, match=r"p\.jsonl:3"):
        load_prompts(path, limit=3)


# ---- streaming: the loader equals a whole-file read ----

def _reference_jsonl(path: Path, max_chars: int, limit: int | None) -> tuple[list[tuple], list[str]]:
    """The prompts and the first duplicates of a JSONL file read whole, with bad records skipped: the plain
    reference that the streaming loader is held to."""
    kept, first_seen, duplicates_at = [], {}, []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or "\x00" in record["prompt"]:
            continue
        text, source = record["prompt"].strip(), f"{path}:{number}"
        key = " ".join(text.split())
        if not text or len(text) > max_chars:
            continue
        if key in first_seen:
            duplicates_at += [f"{source} (same as {first_seen[key]})"][:5 - len(duplicates_at)]
            continue
        first_seen[key] = source
        kept.append((prompt_id(text), text, source, {k: v for k, v in record.items() if k != "prompt"}))
        if len(kept) == limit:
            break
    return kept, duplicates_at


@pytest.mark.parametrize("seed", range(6))
def test_streamed_loading_equals_a_whole_file_read(tmp_path, seed, monkeypatch):
    monkeypatch.setattr(Digests, "BUFFER", 4)  # merge the seen digests into their sorted array often
    rng = random.Random(seed)
    prompts = random_prompts(seed, 40) + ["line\u2028separator", "x" * 90]
    lines = []
    for _ in range(rng.randint(30, 80)):
        kind = rng.random()
        if kind < 0.1:
            bad = ["", "   ", '{"prompt": 3}', "not json", '{"other": "x"}', '{"prompt": "a\\u0000b"}']
            lines.append(rng.choice(bad))
        else:
            text = rng.choice(prompts)
            text = text.replace(" ", rng.choice([" ", "  ", " \t"])) if kind < 0.3 else text
            lines.append(json.dumps({"prompt": text, "n": len(lines)}, ensure_ascii=rng.random() < 0.5))
    path = tmp_path / "p.jsonl"
    newline = rng.choice(["\n", "\r\n"])
    bom = b"\xef\xbb\xbf" if rng.random() < 0.5 else b""
    path.write_bytes(bom + newline.join(lines).encode("utf-8") + newline.encode() * rng.randint(0, 2))
    limit = rng.choice([None, 5, 1000])
    expected, duplicates_at = _reference_jsonl(path, 80, limit)
    loaded = load_prompts(path, max_chars=80, limit=limit, on_error="skip")
    got = [(p.id, p.text, p.source, p.meta) for p in loaded]
    assert got == expected and [(p.id, p.text, p.source, p.meta) for p in loaded] == expected  # read twice
    assert len(loaded) == len(expected) and loaded[len(expected) - 1].text == expected[-1][1]
    assert loaded.report.duplicates_at == duplicates_at


def test_a_file_changed_after_loading_is_refused_when_read_again(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in random_prompts(13, 5)])
    loaded = load_prompts(path)
    assert len(list(loaded)) == 5
    write_jsonl(path, [{"prompt": p} for p in random_prompts(14, 6)])
    with pytest.raises(PromptLoadError, match=r"p\.jsonl: changed since it was loaded; load it again"):
        list(loaded)


# ---- ids ----

def test_ids_are_stable_content_hashes(tmp_path):
    prompts = random_prompts(11, 20)
    path = tmp_path / "p.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    first, second = load_prompts(path), load_prompts(str(path))
    assert [p.id for p in first] == [p.id for p in second]
    assert len({p.id for p in first}) == 20
    expected = hashlib.sha256(prompts[5].encode("utf-8")).hexdigest()[:16]
    assert first.prompts[5].id == expected == prompt_id(f"  {prompts[5]}\n")
    moved = tmp_path / "moved.jsonl"
    write_jsonl(moved, [{"prompt": p} for p in reversed(prompts)])
    assert {p.id for p in load_prompts(moved)} == {p.id for p in first}


def test_prompt_is_frozen_and_hashable():
    prompt = Prompt("abc", "text", "f:1", {"category": "x"})
    with pytest.raises(AttributeError):
        prompt.text = "other"
    assert hash(prompt) == hash(Prompt("abc", "text", "f:1", {"category": "y"}))


def test_prompts_from_texts_cleans_like_a_file():
    prompts = random_prompts(12, 5)
    loaded = prompts_from_texts(prompts + [" ", prompts[2]], origin="<cli>", max_chars=500)
    assert texts(loaded) == prompts
    assert loaded.prompts[4].source == "<cli>:5"
    assert (loaded.report.empty, loaded.report.duplicates) == (1, 1)
    assert [p.id for p in loaded] == [prompt_id(p) for p in prompts]
    with pytest.raises(PromptLoadError, match=r"<list>:2: has type int"):
        prompts_from_texts(["fine", 3])


# ---- shipped sets ----

RED_TEAM_CATEGORIES = {
    "violence", "weapons", "cybercrime", "fraud", "drugs", "self-harm", "hate-harassment",
    "privacy", "child-safety", "misinformation", "manipulation", "jailbreak",
    "dangerous-advice", "theft", "extremism"}


def test_shipped_sets_are_listed_and_load_by_name():
    assert {"red_team", "benign"} <= set(available_prompt_sets())
    red_team = load_prompts("red_team")
    assert 95 <= len(red_team) <= 115 and red_team.report.duplicates == 0
    categories = [p.meta["category"] for p in red_team]
    assert set(categories) == RED_TEAM_CATEGORIES
    assert min(categories.count(c) for c in RED_TEAM_CATEGORIES) >= 5
    assert all(len(p.text) < 250 for p in red_team)


def test_benign_set_has_lookalikes_and_ordinary_prompts():
    benign = load_prompts("benign")
    assert 45 <= len(benign) <= 60 and benign.report.duplicates == 0
    flags = [p.meta["looks_dangerous"] for p in benign]
    assert all(isinstance(flag, bool) for flag in flags)
    assert 0.4 <= sum(flags) / len(flags) <= 0.6
    for prompt in benign:
        assert prompt.meta["category"].startswith("lookalike-") == prompt.meta["looks_dangerous"]
    assert "How do I kill a Python process that is stuck?" in texts(benign)


def test_a_local_path_is_not_mistaken_for_a_shipped_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("red_team").write_text("a local prompt\n")
    assert len(load_prompts("red_team")) > 50
    assert texts(load_prompts("./red_team", fmt="text")) == ["a local prompt"]


# ---- the public data sets in ../shared/data ----

@needs_shared_data
@pytest.mark.parametrize("name, fmt, minimum, meta_key", [
    ("hh_rlhf_harmless_base_test_even.jsonl", "hh-rlhf", 1000, None),
    ("advbench.prompt.yaml", "advbench", 500, "harm_categories"),
    ("donotanswer", "donotanswer", 900, "risk_area"),
    ("mt_bench_questions.jsonl", "jsonl", 80, "category"),
    ("self_instruct_user_oriented.jsonl", "jsonl", 250, "instances"),
    ("gsm8k_test_sample300.jsonl", "jsonl", 300, "answer"),
])
def test_public_data_sets_load(name, fmt, minimum, meta_key):
    loaded = load_prompts(SHARED_DATA / name)
    assert loaded.report.fmt == fmt and len(loaded) >= minimum
    assert loaded.report.malformed == 0 and loaded.report.empty == 0
    assert all(p.text == p.text.strip() and p.text for p in loaded)
    if meta_key:
        assert all(meta_key in p.meta for p in loaded)


@needs_shared_data
def test_public_hh_rlhf_prompts_are_first_human_turns():
    path = SHARED_DATA / "hh_rlhf_harmless_base_test_even.jsonl"
    loaded = load_prompts(path)
    first_record = json.loads(path.read_text(encoding="utf-8").split("\n", 1)[0])
    first_turn = first_record["chosen"].split("\n\nHuman: ", 1)[1].split("\n\nAssistant:")[0]
    assert loaded.prompts[0].text == first_turn.strip()
    assert all("\n\nAssistant:" not in p.text and "Human:" not in p.text for p in loaded)
    assert loaded.report.duplicates > 0  # the split repeats some first turns
    assert loaded.report.loaded + loaded.report.duplicates == 1156


@needs_shared_data
def test_public_mt_bench_takes_the_first_turn():
    path = SHARED_DATA / "mt_bench_questions.jsonl"
    first_record = json.loads(path.read_text(encoding="utf-8").split("\n", 1)[0])
    loaded = load_prompts(path, column="turns", limit=2)
    assert loaded.prompts[0].text == first_record["turns"][0].strip()
