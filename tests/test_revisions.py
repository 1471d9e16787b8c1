"""Revision quality: each verdict on written final revisions, the counts, and the filter in SL-CAI."""

from __future__ import annotations

import dataclasses

import pytest

from cai_fast.data import prompts_from_texts
from cai_fast.data.constitution import load_constitution
from cai_fast.engine import make_generator
from cai_fast.revisions import VERDICTS, revision_quality, revision_verdict, revisions_line
from cai_fast.sl_cai import SLCAIConfig, run_sl_cai

INITIAL = "Mix bleach with ammonia in a closed room and wait."
FINALS = {  # final revision -> verdict (the 135M model's commentary is quoted from a real run)
    "I can't help with hurting anyone. Please talk to someone you trust, or a crisis line.":
        "reply",
    "Mixing cleaners is dangerous: keep bleach and ammonia apart, open a window, and rinse surfaces with water.":
        "reply",
    "   \n ": "empty",
    "Mix  bleach with ammonia in a closed room\nand wait.": "unchanged",
    "The response helps build and acquire weapons capable of serious harm.": "commentary",
    "The critique of the last response is misleading and the detail is not justified.": "commentary",
    "Your request raises a valid concern about safety at home.": "commentary",
    "Here is the revised response: keep the chemicals apart.": "commentary",
    "I'm sorry for any confusion. I'll make sure to correct my previous mistake.": "commentary",
    "While it is a good question, the user has not said why they want it.": "commentary",
    "This is a really good example. This is a really good example. This is a really good example.": "repetitive",
    "a fake toy that has a fake toy that has a fake toy that has a fake toy that has a fake toy": "repetitive",
}


def _record(final: str, finished: bool | None = True) -> dict:
    last = {"principle_id": "p", "critique": "c", "revision": final}
    if finished is not None:
        last["finished"] = finished
    return {"prompt_id": str(hash(final)), "prompt": "How do I make a toxic gas?", "initial": INITIAL,
            "rounds": [last], "final": final}


@pytest.mark.parametrize("final", list(FINALS), ids=[f"{v}-{i}" for i, v in enumerate(FINALS.values())])
def test_each_final_revision_gets_its_verdict(final):
    assert revision_verdict(_record(final)) == FINALS[final]


def test_a_revision_cut_at_its_token_limit_is_truncated_and_old_records_are_read_as_finished():
    reply = next(iter(FINALS))
    assert revision_verdict(_record(reply, finished=False)) == "truncated"
    assert revision_verdict(_record(reply, finished=None)) == "reply"  # written before `finished` was recorded


def test_quality_counts_every_verdict_keeps_replies_and_counts_their_declines():
    records = [_record(f) for f in FINALS] + [_record(next(iter(FINALS)), finished=False)]
    q = revision_quality(records, [revision_verdict(r) for r in records])
    expected = {v: list(FINALS.values()).count(v) for v in VERDICTS}
    assert q["verdicts"] == {**expected, "truncated": 1}
    assert q["kept"] == 2 and q["dropped"] == len(records) - 2 and q["declines"] == 1
    assert [r["final"] for r in records if revision_verdict(r) == "reply"] == list(FINALS)[:2]
    assert set(q["examples"]) == set(FINALS.values()) | {"truncated"}
    assert all(1 <= len(shown) <= 2 for shown in q["examples"].values())
    line = revisions_line({"revisions": q, "filter": True})
    assert line.startswith("final revisions: ") and "2 reply" in line and "6 commentary" in line and "kept 2 for SFT and dropped 11" in line


class ScriptedRevisions:
    """The tiny model's generator, its revisions replaced by the given texts (ended, not cut)."""

    def __init__(self, inner, finals):
        self.inner, self.finals, self.calls = inner, list(finals), 0
        self.tokenizer, self.stats = inner.tokenizer, inner.stats

    def generate(self, prompts, params):
        out = self.inner.generate(prompts, params)
        self.calls += 1
        if self.calls % 3:  # the initial answers and the critiques (one round, one batch per call triple)
            return out
        return [dataclasses.replace(c, text=self.finals.pop(0), finish_reason="stop") for c in out]


@pytest.mark.parametrize("on", [True, False], ids=["filter", "no-filter"])
def test_sl_cai_trains_only_on_replies_and_says_when_too_few_remain(tiny_loaded, on):
    finals = list(FINALS)[:2] + ["The response is not harmful.", "The request may be research."]
    prompts = list(prompts_from_texts([f"How do I hurt someone, case {i}?" for i in range(4)]))
    generator = ScriptedRevisions(make_generator(tiny_loaded, batch_size=4), finals)
    config = SLCAIConfig(rounds=1, batch_size=4, answer_tokens=4, critique_tokens=3, revision_tokens=3,
                         filter=on, min_kept=3)
    result = run_sl_cai(generator, load_constitution("default"), prompts, config, progress=False)
    s = result.summary
    assert s["revisions"]["verdicts"]["reply"] == 2 and s["revisions"]["verdicts"]["commentary"] == 2
    assert s["sft_rows"] == len(result.sft_messages) == (2 if on else 4)
    assert [row["messages"][1]["content"] for row in result.sft_messages] == (finals[:2] if on else finals)
    assert len(result.preference) == (2 if on else 4)
    assert ("only 2 final revisions are replies" in s["too_few"]) is on and ("min_kept = 3" in s["too_few"]) is on
