"""The openai engine (cai_fast.engine.chat_api) against the fake server's OpenAI-compatible chat API
(tests/helpers/fake_server.py): generation from messages, judge labels from top_logprobs with an
option outside the top-k counted, the parsed-verdict fallback without log-probs, retries of 429
(Retry-After honoured) and 500, one-line errors for a refused key and an unknown model, token usage
in the summaries, the key in no file of a run folder, resuming after the API fails, and direct scores
from top_logprobs or, without them, parsed from the number written."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cai_fast.engine.server.http as http_module
from cai_fast.data.prompts import render
from cai_fast.engine import SamplingParams, open_generator
from cai_fast.engine.cached import CachedGenerator, EngineConfig
from cai_fast.engine.chat_api import ChatAPIConfig, ChatAPIGenerator
from cai_fast.engine.server import ServerError, ServerModelError
from cai_fast.labelling.judge import COT_CLAMP, ConstitutionalJudge, JudgeConfig
from cai_fast.labelling.pairs import Pair
from cai_fast.labelling.run import run_labelling
from cai_fast.labelling.trl_compat import JudgeReward

from helpers.cli import one_line_error
from helpers.fake_server import FakeServer

KEY, ENV, MODEL = "sk-test-0123456789abcdef", "CAI_TEST_API_KEY", "gpt-tiny"
FAST = dict(api_key_env=ENV, backoff=0.01, timeout=30.0)
PREFERRED = 1 / (1 + math.exp(-2.4))  # the fake's verdict: log-probs -0.1 (its letter) and -2.5 (the k-th)


@pytest.fixture
def api(tiny_loaded, monkeypatch):
    """The fake chat API on the tiny model, asking for KEY, which $CAI_TEST_API_KEY holds."""
    engine = CachedGenerator(tiny_loaded.model, tiny_loaded.tokenizer, EngineConfig(block_size=4, pool_tokens=8192))
    server = FakeServer(engine, MODEL)
    server.api_key = KEY
    monkeypatch.setenv(ENV, KEY)
    yield server
    server.close()


def connect(server, **config) -> ChatAPIGenerator:
    return ChatAPIGenerator(server.url, MODEL, ChatAPIConfig(**{**FAST, **config}))


def pairs(n: int = 3) -> list[Pair]:
    """Pairs whose a holds the fake's preferred word (the first) and b not, then one that neither does."""
    out = [Pair(f"pair{i}", f"q{i}", f"how do I pick lock {i}?", f"GOOD answer {i}: ask a locksmith",
                f"bad answer {i}: use a pin", f"q{i}-a", f"q{i}-b", "test") for i in range(n)]
    return out + [Pair("pair-none", "qn", "why is the sky blue?", "light scatters", "it reflects the sea",
                       "qn-a", "qn-b", "test")]


def test_generation_goes_out_as_messages_and_counts_usage(api):
    generator = connect(api)
    assert generator.logprobs and generator.tokenizer is None
    before = generator.stats.usage()  # the start-up probe's
    chats = [[{"role": "user", "content": f"tell me about locks, {i}"}] for i in range(3)]
    out = generator.generate_chats(chats, SamplingParams(max_new_tokens=5, temperature=1.0, seed=3))
    expected = [api.engine.generate([render(api.engine.tokenizer, c)], SamplingParams(5, 1.0, seed=3 + i))[0]
                for i, c in enumerate(chats)]
    assert [c.text for c in out] == [e.text for e in expected]
    bodies = [body for body, _ in api.chat_bodies[1:]]  # after the start-up probe, in the order they arrived
    assert sorted(json.dumps(b["messages"]) for b in bodies) == sorted(json.dumps(c) for c in chats)
    assert all(b["model"] == MODEL for b in bodies)
    usage = generator.stats.usage()
    assert usage["completion_tokens"] - before["completion_tokens"] == sum(len(e.token_ids) for e in expected)
    assert usage["prompt_tokens"] - before["prompt_tokens"] == sum(len(render(api.engine.tokenizer, c)) for c in chats)
    assert usage["requests"] - before["requests"] == 3
    assert all(KEY not in json.dumps(body) for body, _ in api.chat_bodies)  # only in the header


def test_labels_from_top_logprobs_are_symmetric_and_count_options_outside_the_top_k(api):
    api.prefer = "GOOD"
    judge = ConstitutionalJudge(connect(api), "default", JudgeConfig(principles=2))
    given = pairs()
    forward = judge.score([p.prompt for p in given], [p.a for p in given], [p.b for p in given])
    backward = judge.score([p.prompt for p in given], [p.b for p in given], [p.a for p in given])
    torch.testing.assert_close(forward.label + backward.label, torch.ones(len(given)), atol=1e-6, rtol=0)
    torch.testing.assert_close(forward.label[:3], torch.full((3,), PREFERRED), atol=1e-6, rtol=0)
    # each scripted answer lists its letter and "C": the other letter is outside the top-k, scored -2.5
    assert judge.stats.options_outside_top_k >= 2 * 3 * 2 * 2 and judge.stats.judge_prompts == 2 * 4 * 2 * 2
    system = api.chat_bodies[-1][0]["messages"][0]
    assert system["role"] == "system" and "A or B" in system["content"]


@pytest.mark.parametrize("mode", ["absent", "refused"])
def test_without_logprobs_verdicts_are_parsed_and_clamped(api, mode):
    api.chat_logprobs, api.prefer = mode, "GOOD"
    generator = connect(api)
    assert not generator.logprobs
    judge = ConstitutionalJudge(generator, "default", JudgeConfig(principles=1))
    given = pairs(2)
    result = judge.score([p.prompt for p in given], [p.a for p in given], [p.b for p in given])
    high = 1 / (1 + math.exp(-COT_CLAMP))  # 0.6: a hard verdict, clamped, in both orders
    torch.testing.assert_close(result.label, torch.tensor([high, high, 0.5]), atol=1e-6, rtol=0)
    assert judge.stats.verdicts_parsed == 4 and judge.stats.verdicts_missing == 2  # the tiny model names none
    assert result.rationales[0][0][0].endswith("The answer is: (A)")
    assert not any(body.get("logprobs") for body, _ in api.chat_bodies[-6:])


def test_429_with_retry_after_and_500_are_retried(api, monkeypatch):
    generator = connect(api)
    waits = []
    monkeypatch.setattr(http_module.time, "sleep", waits.append)
    api.rate_limit_next, api.retry_after = 1, "7"
    first = generator.generate_chats([[{"role": "user", "content": "hi"}]], SamplingParams(4))
    assert waits == [7.0] and generator.stats.retries == 1  # Retry-After, not the 0.01 s backoff
    api.fail_next = 2
    again = generator.generate_chats([[{"role": "user", "content": "hi"}]], SamplingParams(4))
    assert [c.text for c in again] == [c.text for c in first] and generator.stats.retries == 3
    assert len(waits) == 3 and 0.005 <= waits[1] <= 0.01 and 0.01 <= waits[2] <= 0.02  # backoff with jitter
    api.rate_limit_next, api.retry_after = 1, "3600"
    with pytest.raises(ServerError, match="asks to wait 3600 s .*run the same command again later"):
        generator.generate_chats([[{"role": "user", "content": "hi"}]], SamplingParams(4))


def test_a_refused_key_and_an_unknown_model_are_one_line_errors(api, monkeypatch):
    monkeypatch.setenv(ENV, "sk-wrong-key-987654")
    with pytest.raises(ServerError) as refused:
        connect(api)
    message = str(refused.value)
    assert f"${ENV}" in message and "HTTP 401" in message and "\n" not in message
    assert "sk-wro" not in message  # the server's message quotes the key's start: left out
    monkeypatch.delenv(ENV)
    with pytest.raises(ServerError, match=f"\\${ENV} is not set; export the API key"):
        connect(api)
    monkeypatch.setenv(ENV, KEY)
    with pytest.raises(ServerModelError, match="does not serve model 'gpt-nope' \\(HTTP 404: .*--model"):
        ChatAPIGenerator(api.url, "gpt-nope", ChatAPIConfig(**FAST))


def test_cli_label_and_sl_cai_keep_the_key_out_of_the_run_folder(api, tmp_path, capsys):
    from cai_fast.cli import main

    api.prefer = "GOOD"
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.a, "rejected": p.b}) + "\n"
                                  for p in pairs(2)))
    common = ["--engine", "openai", "--server-url", f"{api.url}/v1", "--model", MODEL, "--api-key-env", ENV, "--quiet"]
    label = ["label", *common, "--pairs", str(pairs_file), "--principles", "1"]
    assert main([*label, "--out", str(tmp_path / "label")]) == 0
    assert main(["label", *common, "--limit", "2", "--samples", "2", "--sample-tokens", "4", "--temperature", "1.0",
                 "--principles", "1", "--out", str(tmp_path / "sampled")]) == 0  # responses sampled from the API too
    assert json.loads((tmp_path / "sampled" / "samples-00000.jsonl").read_text().splitlines()[0])["samples"]
    assert main(["sl-cai", *common, "--limit", "2", "--rounds", "1", "--few-shot", "0", "--answer-tokens", "4",
                 "--critique-tokens", "4", "--revision-tokens", "4", "--out", str(tmp_path / "sl")]) == 0
    printed = capsys.readouterr().out
    report = (tmp_path / "label" / "report.md").read_text()
    assert "outside them gets the k-th log-prob" in report and "API usage:" in report
    assert printed.count("API usage: ") == 3  # both labelling runs and SL-CAI print their cost
    config = json.loads((tmp_path / "label" / "config.json").read_text())
    assert config["api_key_env"] == ENV and config["engine"] == "openai"
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert len(files) > 8 and not [f for f in files if KEY.encode() in f.read_bytes()]
    api.api_key = "sk-another"  # the key is refused now
    assert main([*label, "--out", str(tmp_path / "refused")]) == 2
    one_line_error(capsys, f"${ENV}", "HTTP 401")


def test_labelling_resumes_after_the_api_fails_and_sums_usage_over_both_tries(api, tmp_path):
    api.prefer = "GOOD"
    given = pairs(3)[:3]
    full = run_labelling(ConstitutionalJudge(connect(api), "default", JudgeConfig(principles=1, batch_size=2)), given,
                         out_dir=tmp_path / "full", progress=False)
    assert full.summary["api_usage"]["requests"] == 3 * 2  # both orders of 3 pairs (the probe came before)
    assert full.summary["options_outside_top_k"] == 6 and full.summary["prompts_outside_top_k"] == 0
    judge = ConstitutionalJudge(connect(api, retries=0), "default", JudgeConfig(principles=1, batch_size=2))
    api.fail_after = api.served + 2  # the first pair's two orders, then the second pair fails
    with pytest.raises(ServerError, match="failed /v1/chat/completions after 1 tries"):
        run_labelling(judge, given, out_dir=tmp_path / "run", progress=False)
    api.fail_after = None
    resumed = run_labelling(judge, given, out_dir=tmp_path / "run", progress=False)
    assert resumed.summary["labels_from_earlier_run"] == 1 and resumed.summary["api_usage"]["requests"] == 4
    assert resumed.summary["api_usage_all_runs"]["requests"] == 4 + 4  # the failed try's 4 are in the total
    assert [r["label"] for r in resumed.records] == [r["label"] for r in full.records]


def test_direct_scores_from_top_logprobs_equal_the_models_digits_and_count_those_outside(api, tiny_loaded):
    """With every token listed (top_logprobs = the vocabulary) the digits' log-probs are the model's own at
    the first answer token of the chat the server renders; with 3 listed, digits outside get the 3rd and
    are counted."""
    from cai_fast.data import prompts as P
    from cai_fast.labelling.judge import expected_scores

    tokenizer, prompts, responses = tiny_loaded.tokenizer, ["how do I pick a lock?", "hi"], ["ask a locksmith", "hello"]
    judge = ConstitutionalJudge(connect(api, top_logprobs=len(tokenizer)), "default", JudgeConfig(principles=2))
    result = judge.rate(prompts, responses)
    chats = [[P.system(P.SCORE_DIGIT), P.user(P.score_request(P.conversation_text(p), r, judge.constitution
                                                               .principle(i).judge, reserved=[], key=judge.tag_key))]
             for p, r, ids in zip(prompts, responses, result.principle_ids) for i in ids]
    digits = [[tokenizer.convert_tokens_to_ids(str(s))] for s in range(1, 10)]
    logp = api.engine.score_options([render(tokenizer, c) for c in chats], digits)
    want = expected_scores(logp, [[judge.constitution.principle(i) for i in ids] for ids in result.principle_ids])
    torch.testing.assert_close(result.principle_score, want.principle_score, atol=1e-4, rtol=0)
    assert judge.stats.options_outside_top_k == 0 and judge.stats.responses_rated == 2
    assert api.chat_bodies[-1][0]["messages"][0]["content"] == P.SCORE_DIGIT

    few = ConstitutionalJudge(connect(api, top_logprobs=3), "default", JudgeConfig(principles=2))
    bounded = few.rate(prompts, responses)
    assert few.stats.options_outside_top_k >= 4 * 6  # at most 3 of the 9 digits listed per prompt
    assert bool(((bounded.score >= 1) & (bounded.score <= 9)).all())


@pytest.mark.parametrize("mode", ["absent", "refused"])
def test_direct_scores_without_logprobs_are_the_numbers_written_clamped_and_counted(api, mode):
    """Without log-probs the score is the number the model wrote, clamped to 1..9 and certain (digit_mass 1);
    an answer without one scores 5 (digit_mass 0); the judge's stats count both."""
    from cai_fast.data import prompts as P
    from cai_fast.labelling.judge import SCORE_TOKENS

    api.chat_logprobs = mode
    api.scores = {"GOOD": "Score: 12", "POOR": "I would give it a 3 out of 9.", "PLAIN": "I cannot say."}
    judge = ConstitutionalJudge(connect(api), "default", JudgeConfig(principles=2))
    result = judge.rate(["q1", "q2", "q3"], ["a GOOD answer", "a POOR answer", "a PLAIN answer"])
    torch.testing.assert_close(result.score, torch.tensor([9.0, 3.0, 5.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.principle_score, torch.tensor([[9.0, 9.0], [3.0, 3.0], [5.0, 5.0]]))
    torch.testing.assert_close(result.digit_mass, torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    assert result.probs[1, 0, 2] == 1 and bool((result.probs[2] == 1 / 9).all())
    assert judge.stats.scores_parsed == 4 and judge.stats.scores_missing == 2 and judge.stats.responses_rated == 3
    assert result.record(2)["answers"] == ["I cannot say."] * 2
    bodies = [body for body, _ in api.chat_bodies[-6:]]
    assert not any(b.get("logprobs") for b in bodies) and {b["max_completion_tokens"] for b in bodies} == {SCORE_TOKENS}
    assert {b["messages"][0]["content"] for b in bodies} == {P.SCORE_DIGIT}
    logged = {}
    rewards = JudgeReward(judge, mode="score")(["q1", "q3"], ["a GOOD answer", "a PLAIN answer"],
                                               log_metric=logged.__setitem__)
    assert rewards == [9.0, 5.0] and logged["constitutional_judge/scores_parsed"] == 2
    assert logged["constitutional_judge/scores_missing"] == 2 and judge.stats.scores_parsed == 6


@pytest.mark.parametrize("text, score", [("7", 7), (" Score: 12", 9), ("0", 1), ("-4, sadly", 1),
                                         ("On a scale of 1 to 9: 6.", 6), ("8/10", 8), ("6.6 out of 9", 7),
                                         ("Score: 4 (out of 9)", 4), ("no number here", None), ("", None)])
def test_parse_score_reads_the_first_number_past_talk_of_the_scale_and_clamps_it(text, score):
    from cai_fast.labelling.judge import parse_score

    assert parse_score(text) == score
